"""What compose/ resolves to, checked through `docker-compose config`: every
published port on 127.0.0.1, Prometheus without its lifecycle API, the Docker
socket mounted only into the gates, passwords only as secret files, and no
stack from an unedited .env.example. And a placeholder password file stops a
tickscale process before it starts, naming the file.

Needs only the compose client (no engine, no images): the files are resolved,
nothing is started.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tickscale.stack_secrets import STACK_SECRETS, make_secrets

COMPOSE_DIR = Path(__file__).resolve().parent.parent / "compose"
VARIANTS = ((), ("swarm.yml",))
REQUIRED = ("SECRETS_DIR",)


def _compose() -> list[str]:
    v1 = shutil.which("docker-compose")
    if v1:
        return [v1]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    pytest.skip("needs docker compose (v2 plugin) or docker-compose (v1)")


def _config(
    tmp_path: Path, variant: tuple[str, ...], **settings: str
) -> subprocess.CompletedProcess:
    env_file = tmp_path / f"{uuid.uuid4().hex}.env"
    text = (COMPOSE_DIR / ".env.example").read_text()
    env_file.write_text(text + "".join(f"\n{k}={v}" for k, v in settings.items()) + "\n")
    files = [a for f in ("docker-compose.yml", *variant) for a in ("-f", str(COMPOSE_DIR / f))]
    clean = {k: v for k, v in os.environ.items() if k not in REQUIRED}
    return subprocess.run(
        [*_compose(), *files, "--env-file", str(env_file), "config"],
        capture_output=True, text=True, timeout=60, check=False, env=clean,
    )  # fmt: skip


def _services(config: str) -> dict[str, str]:
    """Each service's block of the resolved YAML, by name."""
    body = config.split("\nservices:\n", 1)[1]
    body = re.split(r"\n(?=\S)", body, maxsplit=1)[0]
    parts = re.split(r"\n  (?=[A-Za-z0-9_-]+:\n)", "\n" + body)
    return {p.split(":", 1)[0].strip(): p for p in parts if p.strip()}


@pytest.mark.parametrize("variant", VARIANTS, ids=["main", "swarm"])
def test_published_ports_socket_and_prometheus_flags(
    tmp_path: Path, variant: tuple[str, ...]
) -> None:
    r = _config(tmp_path, variant, SECRETS_DIR=str(tmp_path / "secrets"))
    assert r.returncode == 0, r.stderr
    services = _services(r.stdout)
    assert {"kafka", "redis", "scaler", "prometheus", "docker-gate", "docker-gate-ro"} <= set(
        services
    )
    published = re.findall(r"\n    ports:\n((?:    - .*\n)+)", r.stdout)
    entries = [e.strip()[2:] for block in published for e in block.splitlines()]
    assert len(entries) == 3, entries
    assert all(e.startswith("127.0.0.1:") for e in entries), entries
    assert "--web.enable-lifecycle" not in services["prometheus"]
    with_socket = {n for n, block in services.items() if "/var/run/docker.sock" in block}
    assert with_socket == {"docker-gate", "docker-gate-ro"}, with_socket
    assert "DOCKER_HOST: tcp://docker-gate:2375" in services["scaler"]
    # The gate is reachable from the scaler, and from nothing on the md network.
    assert "dockerapi-scaler" in services["scaler"]
    assert "md:" not in services["docker-gate"] and "md:" not in services["docker-gate-ro"]


@pytest.mark.parametrize("variant", VARIANTS, ids=["main", "swarm"])
def test_passwords_are_secret_files_only(tmp_path: Path, variant: tuple[str, ...]) -> None:
    secrets_dir = tmp_path / "secrets"
    r = _config(tmp_path, variant, SECRETS_DIR=str(secrets_dir))
    assert r.returncode == 0, r.stderr
    # No password in any environment or command line: only *_FILE pointers and files.
    env_keys = re.findall(r"^\s+([A-Z][A-Z0-9_]*PASSWORD[A-Z0-9_]*):", r.stdout, re.M)
    assert env_keys and all(k.endswith("__FILE") for k in env_keys), env_keys
    assert "redis://:" not in r.stdout and "requirepass" not in r.stdout.replace(
        "'requirepass %s", ""
    )
    top = re.split(r"\n(?=\S)", r.stdout.split("\nsecrets:\n", 1)[1], maxsplit=1)[0]
    declared = set(re.findall(r"^  ([a-z_]+):$", top, re.M))
    assert declared == set(STACK_SECRETS), declared
    assert all(f"{secrets_dir}/{n}" in top for n in STACK_SECRETS), top
    services = _services(r.stdout)
    # The handlers' files: what the scaler mounts is exactly what its gate allows.
    scaler = re.search(r"TICKSCALE_SCALER_HANDLER_SECRETS: ([^}]*)", services["scaler"])
    gate = re.search(r"TICKSCALE_GATE_SECRETS: ([^}]*)", services["docker-gate"])
    assert scaler and gate and scaler.group(1) == gate.group(1), (scaler, gate)
    assert "tickscale_redis_password" in scaler.group(1)


def test_an_unedited_env_example_is_refused_naming_the_setting(tmp_path: Path) -> None:
    r = _config(tmp_path, ())
    assert r.returncode != 0, r.stdout
    assert "set SECRETS_DIR in compose/.env" in r.stderr, r.stderr


def test_tickscale_secrets_makes_every_file_once(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    assert set(make_secrets(folder)) == set(STACK_SECRETS)
    before = {n: (folder / n).read_text() for n in STACK_SECRETS}
    assert all(len(v.strip()) >= 16 for v in before.values())
    assert len(set(before.values())) == len(STACK_SECRETS)
    assert make_secrets(folder) == []  # existing files are kept
    assert {n: (folder / n).read_text() for n in STACK_SECRETS} == before
    assert (folder.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize(
    ("file", "value"),
    [("tickscale_redis_password", "change-me"), ("tickscale_kafka_password", "short")],
)
def test_a_placeholder_password_file_stops_the_process_naming_it(
    tmp_path: Path, file: str, value: str
) -> None:
    (tmp_path / file).write_text(value + "\n")
    env = os.environ | {"TICKSCALE_SECRETS_DIR": str(tmp_path), "TICKSCALE_KAFKA_USERNAME": "x"}
    r = subprocess.run(
        [sys.executable, "-m", "tickscale", "topics", "--bootstrap", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the secret file {file}:"), r.stderr
    assert "Traceback" not in r.stderr


def test_kafka_authenticates_every_client_listener() -> None:
    props = dict(
        line.split("=", 1)
        for line in (COMPOSE_DIR / "kafka" / "server.properties").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    protocols = dict(p.split(":") for p in props["listener.security.protocol.map"].split(","))
    listeners = dict(
        (lambda name, addr: (name, addr))(*x.split("://")) for x in props["listeners"].split(",")
    )
    # The one unauthenticated listener is the controller's, on the container's loopback.
    assert {n for n, p in protocols.items() if p != "SASL_PLAINTEXT"} == {"CONTROLLER"}
    assert listeners["CONTROLLER"].startswith("localhost:"), listeners
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert not any("password=" in v for v in props.values()), props


@pytest.mark.parametrize("variant", VARIANTS, ids=["main", "swarm"])
def test_each_kafka_client_runs_as_its_own_principal(
    tmp_path: Path, variant: tuple[str, ...]
) -> None:
    r = _config(tmp_path, variant, SECRETS_DIR=str(tmp_path / "secrets"))
    assert r.returncode == 0, r.stderr
    services = _services(r.stdout)
    expected = {"topics": "admin", "replay": "replay", "scaler": "scaler", "verify": "verify"}
    for service, principal in expected.items():
        block = services[service]
        assert f"TICKSCALE_KAFKA_USERNAME: {principal}" in block, block
        # Its password file mounted as the file its settings read.
        assert re.search(
            rf"source: kafka_{principal}_password\n\s+target: tickscale_kafka_password", block
        ), block
    assert "TICKSCALE_SCALER_HANDLER_KAFKA_USERNAME: handler" in services["scaler"]
    handler_files = re.search(r"TICKSCALE_SCALER_HANDLER_SECRETS: ([^}]*)", services["scaler"])
    assert handler_files, services["scaler"]
    assert re.search(r"kafka.handler.password", handler_files.group(1)), handler_files.group(1)
