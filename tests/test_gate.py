"""The Docker API gate (tickscale.gate) against the real engine.

A gate process listens on loopback in front of /var/run/docker.sock; the
tests drive it with the docker SDK, as the scaler does. What a handler fleet
needs goes through (create from the handler image with the fleet's labels,
start, inspect, list, stop, remove); every other call is tried for real and
must come back 403 with the engine left unchanged.

Handler image here: the local base image (any image on the engine does; the
gate only compares its name). Everything a test creates is removed afterwards.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from docker.errors import APIError, NotFound
from docker.types import Mount

import docker as docker_sdk
from core.constants import LABEL_ROLE, LABEL_SCALER
from tests.docker_utils import docker, engine_problem
from tickscale.localstack.net import free_port

_PROBLEM = engine_problem()
if _PROBLEM:
    pytest.skip(f"needs a Docker engine: {_PROBLEM}", allow_module_level=True)

pytestmark = pytest.mark.docker

IMAGE = "tickscale/base:bookworm"
OTHER_IMAGE = "python:3.11-slim-bookworm"  # the same layers under another name
ENGINE_SOCKET = "/var/run/docker.sock"


def _start_gate(fleet: str, extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = (
        os.environ
        | {
            "TICKSCALE_GATE_IMAGE": IMAGE,
            "TICKSCALE_GATE_FLEET": fleet,
            "TICKSCALE_GATE_HOST": "127.0.0.1",
            "TICKSCALE_GATE_PORT": str(port),
            "TICKSCALE_GATE_ENGINE_SOCKET": ENGINE_SOCKET,
        }
        | extra
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tickscale.gate"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"tcp://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            docker_sdk.DockerClient(base_url=url, timeout=5).ping()
            return proc, url
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"gate did not start: {proc.stderr.read()!r}") from None
            time.sleep(0.2)


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.skip(f"image {IMAGE} missing: run `bash docker/base/build.sh`")
    client = docker_sdk.DockerClient(base_url=f"unix://{ENGINE_SOCKET}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def fleet(engine: Any) -> Iterator[str]:
    name = f"gate{uuid.uuid4().hex[:8]}"
    yield name
    for c in engine.containers.list(all=True, filters={"label": f"{LABEL_SCALER}={name}"}):
        c.remove(force=True)
    for c in engine.containers.list(all=True, filters={"name": name}):
        c.remove(force=True)


@pytest.fixture(scope="module")
def gate(fleet: str) -> Iterator[Any]:
    proc, url = _start_gate(fleet, {})
    client = docker_sdk.DockerClient(base_url=url, timeout=60)
    yield client
    client.close()
    proc.terminate()
    proc.wait(10)


def labels(fleet: str) -> dict[str, str]:
    return {LABEL_ROLE: "handler", LABEL_SCALER: fleet}


def create_kwargs(fleet: str, **over: Any) -> dict[str, Any]:
    """What the docker backend sends, give or take the environment."""
    return {
        "image": IMAGE,
        "command": ["sleep", "300"],
        "name": f"{fleet}-{uuid.uuid4().hex[:6]}",
        "labels": labels(fleet),
        "restart_policy": {"Name": "no"},
        "read_only": True,
        "tmpfs": {"/tmp": ""},
        "security_opt": ["no-new-privileges:true"],
        "nano_cpus": int(0.2e9),
        "mem_limit": "64m",
    } | over


def raw(gate: Any, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    host, port = gate.api.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def refused(call: Callable[[], Any]) -> str:
    with pytest.raises(APIError) as info:
        call()
    assert info.value.status_code == 403, info.value
    msg = str(info.value.explanation)
    assert msg.startswith("tickscale gate: "), msg
    return msg


# What goes through -------------------------------------------------------------------


def test_a_handler_container_lives_and_dies_through_the_gate(
    gate: Any, engine: Any, fleet: str
) -> None:
    kwargs = create_kwargs(fleet)
    c = gate.containers.create(**kwargs)
    try:
        # By name as well as by id: the gate checks the container the name
        # points to, then forwards by its id.
        assert gate.api.inspect_container(kwargs["name"])["Id"] == c.id
        c.start()
        c.reload()
        assert c.status == "running"
        listed = gate.containers.list(filters={"label": f"{LABEL_SCALER}={fleet}"})
        assert c.id in [x.id for x in listed]
        assert gate.images.get(IMAGE).id == engine.images.get(IMAGE).id
        c.stop(timeout=1)
        c.reload()
        assert c.status == "exited"
        c.remove(force=True)
        with pytest.raises(NotFound):
            engine.containers.get(c.id)
    finally:
        with pytest.raises(NotFound):
            engine.containers.get(c.id).remove(force=True)


# What is refused ---------------------------------------------------------------------

REFUSED_CREATES: dict[str, tuple[dict[str, Any], str]] = {
    "privileged": ({"privileged": True}, "HostConfig.privileged"),
    "bind mount": ({"volumes": {"/": {"bind": "/host", "mode": "ro"}}}, "HostConfig.binds"),
    "mount": ({"mounts": [Mount("/host", "/etc", type="bind")]}, "HostConfig.mounts"),
    "named volume": ({"volumes": {"gate-vol": {"bind": "/v"}}}, "HostConfig.binds"),
    "root user": ({"user": "0"}, "no User"),
    "other image": ({"image": OTHER_IMAGE}, "is not"),
    "no labels": ({"labels": {}}, "labels must include"),
    "other fleet": ({"labels": labels("someone-else")}, "labels must include"),
    "host network": ({"network_mode": "host"}, "network mode 'host'"),
    "other network": ({"network": "none"}, "network mode 'none'"),
    "capability": ({"cap_add": ["SYS_ADMIN"]}, "HostConfig.capadd"),
    "device": ({"devices": ["/dev/null:/dev/x"]}, "HostConfig.devices"),
    "host pid": ({"pid_mode": "host"}, "HostConfig.pidmode"),
    "host ipc": ({"ipc_mode": "host"}, "HostConfig.ipcmode"),
    "host userns": ({"userns_mode": "host"}, "HostConfig.usernsmode"),
    "unconfined seccomp": ({"security_opt": ["seccomp=unconfined"]}, "security option"),
    "published port": ({"ports": {"80/tcp": 8080}}, "HostConfig.portbindings"),
    "sysctl": ({"sysctls": {"net.ipv4.ip_forward": "1"}}, "HostConfig.sysctls"),
    "volumes from": ({"volumes_from": ["x"]}, "HostConfig.volumesfrom"),
    "anonymous volume": ({"volumes": ["/data"]}, "HostConfig.binds"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_CREATES))
def test_a_create_outside_the_grant_is_refused(
    gate: Any, engine: Any, fleet: str, case: str
) -> None:
    over, why = REFUSED_CREATES[case]
    kwargs = create_kwargs(fleet, **over)
    msg = refused(lambda: gate.containers.create(**kwargs))
    assert why in msg, msg
    with pytest.raises(NotFound):
        engine.containers.get(kwargs["name"])


@pytest.fixture(scope="module")
def stranger(engine: Any, fleet: str) -> Iterator[Any]:
    """A running container that is not this fleet's (no labels), made directly."""
    c = engine.containers.run(IMAGE, ["sleep", "300"], name=f"{fleet}-stranger", detach=True)
    yield c
    c.remove(force=True)


@pytest.fixture(scope="module")
def handler(gate: Any, fleet: str) -> Iterator[Any]:
    """A running handler container of this fleet, made through the gate."""
    c = gate.containers.create(**create_kwargs(fleet))
    c.start()
    yield c
    c.remove(force=True)


def test_a_container_not_of_this_fleet_cannot_be_touched(
    gate: Any, engine: Any, stranger: Any
) -> None:
    api = gate.api
    for call in (
        lambda: api.inspect_container(stranger.id),
        lambda: api.stop(stranger.id, timeout=1),
        lambda: api.kill(stranger.id),
        lambda: api.kill(stranger.id, signal="SIGUSR1"),
        lambda: api.remove_container(stranger.id, force=True),
        lambda: api.start(stranger.id),
        lambda: api.exec_create(stranger.id, ["true"]),
        lambda: api.logs(stranger.id),
    ):
        refused(call)
    stranger.reload()
    assert stranger.status == "running"


def test_a_handler_gets_no_exec_logs_kill_but_the_leave_signal_or_copy(
    gate: Any, handler: Any
) -> None:
    api = gate.api
    for call in (
        lambda: api.exec_create(handler.id, ["true"]),
        lambda: api.logs(handler.id),
        lambda: api.kill(handler.id),
        lambda: api.kill(handler.id, signal="SIGKILL"),
        lambda: api.kill(handler.id, signal="SIGTERM"),
        lambda: api.put_archive(handler.id, "/tmp", b""),
        lambda: api.get_archive(handler.id, "/etc/passwd"),
        lambda: api.update_container(handler.id, mem_limit="1g"),
        lambda: api.commit(handler.id, "sec-gate-commit"),
        lambda: api.pause(handler.id),
        lambda: api.rename(handler.id, "renamed"),
    ):
        refused(call)
    handler.reload()
    assert handler.status == "running"
    # The one signal a rollout sends (its replacement is coming: leave at the next
    # rebalance) goes through; `sleep` as the container's init ignores it.
    api.kill(handler.id, signal="SIGUSR1")
    handler.reload()
    assert handler.status == "running"


def test_the_rest_of_the_engine_is_refused(gate: Any, engine: Any, fleet: str) -> None:
    name = f"{fleet}-x"
    for call in (
        lambda: gate.images.pull("busybox", tag="latest"),
        lambda: gate.images.list(),
        lambda: gate.images.get(OTHER_IMAGE),
        lambda: gate.api.remove_image(IMAGE),
        lambda: gate.volumes.create(name),
        lambda: gate.networks.create(name),
        lambda: gate.networks.list(),
        lambda: gate.info(),
        lambda: gate.api.prune_containers(),
        lambda: gate.swarm.init(advertise_addr="127.0.0.1"),
        lambda: gate.services.list(),
        lambda: gate.secrets.list(),
    ):
        refused(call)
    # Calls the SDK streams or never sends bare, in plain HTTP.
    ours = {"Image": IMAGE, "Labels": labels(fleet), "Cmd": ["true"]}
    volume_only = {"Image": IMAGE, "Labels": labels(fleet), "Volumes": {"/data": {}}}
    for method, path, body in (
        ("GET", "/v1.41/events", None),
        # The engine reads field names in any case, and the last of two wins.
        ("POST", "/containers/create", ours | {"HostConfig": {"privileged": True}}),
        ("POST", "/containers/create", ours | {"hostconfig": {"binds": ["/:/host"]}}),
        (
            "POST",
            "/containers/create",
            ours | {"HostConfig": {}, "hostConfig": {"Privileged": True}},
        ),
        ("POST", "/containers/create", ours | {"image": OTHER_IMAGE}),
        ("POST", "/build?t=" + name, None),
        ("POST", "/v1.41/session", None),
        ("GET", "/v1.41/containers/../images/json", None),
        ("POST", f"/containers/create?name={name}", volume_only),
        (
            "POST",
            "/v1.41/containers/create",
            {"Image": IMAGE, "Labels": labels(fleet), "HostConfig": {"MaskedPaths": []}},
        ),
    ):
        status, answer = raw(gate, method, path, body)
        assert status == 403, (method, path, answer)
    with pytest.raises(NotFound):
        engine.volumes.get(name)
    assert not engine.networks.list(names=[name])


# Prometheus' read-only view ------------------------------------------------------------


def test_observe_mode_lists_and_nothing_else(engine: Any, fleet: str, stranger: Any) -> None:
    proc, url = _start_gate(fleet, {"TICKSCALE_GATE_MODE": "observe", "TICKSCALE_GATE_IMAGE": ""})
    client = docker_sdk.DockerClient(base_url=url, timeout=30)
    try:
        ids = [c["Id"] for c in client.api.containers(all=True)]
        assert stranger.id in ids
        assert "bridge" in [n["Name"] for n in client.api.networks()]
        for call in (
            lambda: client.api.inspect_container(stranger.id),
            lambda: client.containers.create(**create_kwargs(fleet)),
            lambda: client.api.stop(stranger.id, timeout=1),
            lambda: client.api.exec_create(stranger.id, ["true"]),
            lambda: client.networks.create(f"{fleet}-y"),
        ):
            refused(call)
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def test_a_placeholder_free_start_names_the_missing_image() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKSCALE_GATE_")}
    r = subprocess.run(
        [sys.executable, "-m", "tickscale.gate"], env=env, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "TICKSCALE_GATE_IMAGE" in r.stderr and "Traceback" not in r.stderr, r.stderr


# Swarm: the handler service ------------------------------------------------------------


@pytest.fixture(scope="module")
def overlay(swarm: None, engine: Any, fleet: str) -> Iterator[str]:
    net = engine.networks.create(f"{fleet}-overlay", driver="overlay", attachable=True)
    yield net.name
    for s in engine.services.list(filters={"name": fleet}):
        s.remove()
    deadline = time.monotonic() + 30
    while True:
        try:
            net.remove()
            break
        except APIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_swarm_mode_makes_scales_and_removes_only_its_service(
    engine: Any, fleet: str, overlay: str
) -> None:
    proc, url = _start_gate(
        fleet, {"TICKSCALE_GATE_MODE": "swarm", "TICKSCALE_GATE_NETWORK": overlay}
    )
    gate = docker_sdk.DockerClient(base_url=url, timeout=60)
    svc_kwargs: dict[str, Any] = {
        "args": ["sleep", "300"],
        "labels": labels(fleet),
        "container_labels": labels(fleet),
        "mode": docker_sdk.types.ServiceMode("replicated", replicas=0),
        "networks": [overlay],
        "read_only": True,
    }
    stranger = engine.services.create(IMAGE, name=f"{fleet}-stranger", args=["sleep", "300"])
    try:
        assert gate.info()["Swarm"]["LocalNodeState"] == "active"
        ours = gate.services.create(IMAGE, name=f"{fleet}-handlers", **svc_kwargs)
        ours.scale(1)
        assert engine.services.get(ours.id).attrs["Spec"]["Mode"]["Replicated"]["Replicas"] == 1
        assert isinstance(gate.services.get(ours.id).tasks(), list)
        for over in (
            {"mounts": ["/:/host:ro"]},
            {"image": OTHER_IMAGE},
            {"labels": {}},
            {"container_labels": {}},
            {"endpoint_spec": docker_sdk.types.EndpointSpec(ports={8080: 80})},
            {"networks": ["ingress"]},
            {"cap_add": ["SYS_ADMIN"]},
            {"mode": docker_sdk.types.ServiceMode("global")},
            {"mode": docker_sdk.types.ServiceMode("replicated-job")},
        ):
            kw = svc_kwargs | over
            image = kw.pop("image", IMAGE)
            refused(lambda kw=kw, image=image: gate.services.create(image, name=f"{fleet}-x", **kw))
        assert not engine.services.list(filters={"name": f"{fleet}-x"})
        refused(lambda: gate.services.get(stranger.id))
        refused(lambda: gate.api.remove_service(stranger.id))
        refused(lambda: gate.containers.create(**create_kwargs(fleet)))
        refused(lambda: gate.swarm.leave(force=True))
        refused(lambda: gate.nodes.list())
        refused(lambda: gate.secrets.create(name=f"{fleet}-s", data=b"x"))
        engine.services.get(stranger.id)  # still there
        ours.remove()
        with pytest.raises(NotFound):
            engine.services.get(ours.id)
    finally:
        stranger.remove()
        gate.close()
        proc.terminate()
        proc.wait(10)
