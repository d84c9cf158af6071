"""Handler passwords as secret files, against the real engine and a password-protected Redis.

The scaler's docker backend starts a handler container through the gate with
the Redis password bind-mounted read-only as /run/secrets/tickscale_redis_password
(``handler_secrets``): the container's environment (``docker inspect``) carries
no password, and the handler still writes to Redis with it. The gate lets
exactly that mount through and refuses any other bind of the same file.

Image under test: $TICKSCALE_IMAGE, default ``tickscale:dev``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from docker.errors import APIError

import docker as docker_sdk
from core.constants import LABEL_ROLE, LABEL_SCALER, REDIS_HANDLER_STATS
from scaler.backends.base import HandlerSpec
from scaler.backends.docker import ContainerShape, DockerBackend
from tests.docker_utils import docker, engine_problem
from tickscale.localstack.net import free_port
from tickscale.localstack.redis import RedisServer
from tickscale.localstack.topics import TopicSet

IMAGE = os.environ.get("TICKSCALE_IMAGE", "tickscale:dev")
SECRET = "tickscale_redis_password"

_PROBLEM = engine_problem()
if _PROBLEM is None and docker("image", "inspect", IMAGE, check=False).returncode != 0:
    _PROBLEM = f"image {IMAGE} not built: run `bash .ci/docker.sh`"
if _PROBLEM:
    pytest.skip(f"needs a Docker engine: {_PROBLEM}", allow_module_level=True)

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def password() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def secret_file(tmp_path: Path, password: str) -> Path:
    # The folder keeps other users out; the file itself must be readable by the
    # image's user inside the container (docs/security.md).
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o700)
    f = folder / "redis_password"
    f.write_text(password + "\n")
    f.chmod(0o444)
    return f


@pytest.fixture
def locked_redis(tmp_path: Path, password: str) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), work_dir=tmp_path / "redis")
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        client.config_set("requirepass", password)
        client.close()
        yield server
    finally:
        server.stop()


@pytest.fixture
def fleet() -> Iterator[str]:
    name = f"sec{uuid.uuid4().hex[:8]}"
    yield name
    ids = docker("ps", "-aq", "--filter", f"label={LABEL_SCALER}={name}").stdout.split()
    if ids:
        docker("rm", "-f", *ids, check=False)


@pytest.fixture
def gate(fleet: str, secret_file: Path) -> Iterator[str]:
    port = free_port()
    env = os.environ | {
        "TICKSCALE_GATE_IMAGE": IMAGE,
        "TICKSCALE_GATE_FLEET": fleet,
        "TICKSCALE_GATE_HOST": "127.0.0.1",
        "TICKSCALE_GATE_PORT": str(port),
        "TICKSCALE_GATE_ALLOW_HOST_NETWORK": "true",
        "TICKSCALE_GATE_SECRETS": json.dumps({SECRET: str(secret_file)}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tickscale.gate"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"tcp://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            docker_sdk.DockerClient(base_url=url, timeout=5).ping()
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"gate did not start: {proc.stderr.read()!r}") from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


async def test_handler_reads_its_redis_password_from_a_secret_file(
    topics: TopicSet, locked_redis: RedisServer, password: str, secret_file: Path,
    fleet: str, gate: str,
) -> None:  # fmt: skip
    # The URL a scaler would be given with the password in it: the container must not see it.
    with_pw = locked_redis.url.replace("redis://", f"redis://:{password}@")
    from core.secrets import without_redis_password

    spec = HandlerSpec(
        bootstrap=topics.bootstrap, in_topic=topics.raw, out_topic=topics.ticks,
        deadletter_topic=topics.deadletter, group=topics.group,
        redis_url=without_redis_password(with_pw), secrets={SECRET: str(secret_file)},
    )  # fmt: skip
    shape = ContainerShape("host", cpus=0.5, mem_mb=256, host_port_base=free_port())
    backend = DockerBackend(spec, image=IMAGE, name=fleet, shape=shape, docker_host=gate)
    await backend.start()
    try:
        [cid] = await backend.add(1)
        attrs: dict[str, Any] = json.loads(docker("inspect", cid).stdout)[0]
        env = "\n".join(attrs["Config"]["Env"])
        assert password not in env, env
        assert "REDIS_URL=" + locked_redis.url in env, env
        assert attrs["HostConfig"]["Binds"] == [f"{secret_file}:/run/secrets/{SECRET}:ro"]
        name = attrs["Name"].lstrip("/")

        # The handler publishes its stats every second: only with the password from the file.
        client = redis.Redis.from_url(with_pw)
        deadline = time.monotonic() + 90
        while not client.exists(REDIS_HANDLER_STATS + name):
            assert time.monotonic() < deadline, docker("logs", "--tail", "40", cid).stderr
            assert json.loads(docker("inspect", cid).stdout)[0]["State"]["Running"], docker(
                "logs", "--tail", "40", cid
            ).stderr
            await asyncio.sleep(1)
        client.close()
    finally:
        await backend.remove(1)
        await backend.close()


@pytest.mark.parametrize(
    "bind",
    [
        "{f}:/run/secrets/tickscale_redis_password",  # writable
        "{f}:/run/secrets/other:ro",  # another place
        "/etc:/run/secrets/tickscale_redis_password:ro",  # another host path
        "/:/host:ro",
    ],
)
def test_gate_refuses_any_other_mount(fleet: str, gate: str, secret_file: Path, bind: str) -> None:
    client = docker_sdk.DockerClient(base_url=gate, timeout=30)
    try:
        with pytest.raises(APIError) as e:
            client.containers.create(
                IMAGE, ["handler"], labels={LABEL_ROLE: "handler", LABEL_SCALER: fleet},
                network_mode="host", volumes=[bind.format(f=secret_file)],
            )  # fmt: skip
        assert e.value.status_code == 403, e.value
        assert "tickscale gate" in str(e.value)
    finally:
        client.close()
    left = docker("ps", "-aq", "--filter", f"label={LABEL_SCALER}={fleet}").stdout.split()
    assert not left
