"""The gate's rule for handler secret files, as pure decisions on request bodies.

The docker-mode binds are also tried against the real engine in
tests/test_handler_secrets.py; here the swarm-mode secret references, which
need no engine to decide.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from core.constants import LABEL_ROLE, LABEL_SCALER
from tickscale.gate.policy import Allow, Policy, Refuse
from tickscale.gate.settings import GateSettings

IMAGE = "tickscale:dev"
FLEET = "f1"
SECRETS = {"tickscale_redis_password": "ts-redis-password"}
LABELS = {LABEL_ROLE: "handler", LABEL_SCALER: FLEET}


def policy() -> Policy:
    return Policy(
        GateSettings(mode="swarm", image=IMAGE, fleet=FLEET, network="md", secrets=SECRETS)
    )


def service(secrets: list[dict[str, Any]], image: str = IMAGE) -> bytes:
    """A service create body as the docker SDK sends it for the swarm backend."""
    return orjson.dumps({
        "Name": "tickscale-handlers", "Labels": LABELS,
        "Mode": {"Replicated": {"Replicas": 0}},
        "TaskTemplate": {
            "ContainerSpec": {"Image": image, "Labels": LABELS, "Args": ["handler"],
                              "Secrets": secrets},
            "Networks": [{"Target": "md"}],
        },
    })  # fmt: skip


def ref(secret: str, file: str) -> dict[str, Any]:
    return {"SecretID": "abc", "SecretName": secret,
            "File": {"Name": file, "UID": "10001", "GID": "10001", "Mode": 0o400}}  # fmt: skip


def test_the_handler_secret_under_its_name_is_allowed() -> None:
    body = service([ref("ts-redis-password", "tickscale_redis_password")])
    assert policy().decide("POST", "/v1.41/services/create", body) == Allow()
    # Reading its metadata (the scaler needs its id); the engine never returns the data.
    assert policy().decide("GET", "/v1.41/secrets/ts-redis-password", b"") == Allow()


@pytest.mark.parametrize(
    ("secret", "file"),
    [
        ("other-secret", "tickscale_redis_password"),  # another secret under the expected name
        ("ts-redis-password", "tickscale_kafka_password"),  # the secret under another name
    ],
)
def test_any_other_secret_reference_is_refused(secret: str, file: str) -> None:
    decision = policy().decide("POST", "/services/create", service([ref(secret, file)]))
    assert isinstance(decision, Refuse) and "handler secrets" in decision.reason, decision


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/secrets/other-secret"), ("GET", "/secrets"), ("POST", "/secrets/create"),
     ("DELETE", "/secrets/ts-redis-password")],
)  # fmt: skip
def test_other_secret_calls_are_refused(method: str, path: str) -> None:
    assert isinstance(policy().decide(method, path, b"{}"), Refuse)


def test_a_rollout_image_may_run_as_a_service_of_its_own_and_no_other_image() -> None:
    gate = Policy(GateSettings(mode="swarm", image=IMAGE, fleet=FLEET, network="md",
                               secrets=SECRETS, rollout_images="tickscale:v2"))  # fmt: skip
    assert gate.decide("POST", "/v1.41/services/create", service([], "tickscale:v2")) == Allow()
    refused = gate.decide("POST", "/v1.41/services/create", service([], "tickscale:v3"))
    assert isinstance(refused, Refuse) and "tickscale:v3" in refused.reason, refused
