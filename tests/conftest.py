"""Shared fixtures: a real Kafka broker, Redis and per-test topics.

One broker serves the whole session (a JVM start costs seconds); tests stay
independent by using their own uniquely named topics and consumer group from
``topics`` / ``make_topics``.

Set ``TICKSCALE_TEST_BOOTSTRAP=host:port`` to run against an existing broker
instead; tests that need to stop or restart the broker are then skipped.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docker_utils import docker, swarm_state
from tickscale.localstack import KafkaBroker, RedisServer, delete_topics, ensure_topics
from tickscale.localstack.topics import MakeTopics, TopicSet

# The broker this session started, if any; see _kafka_still_up.
_OWNED_BROKER: KafkaBroker | None = None


@dataclass
class ExternalKafka:
    """Stands in for KafkaBroker when TICKSCALE_TEST_BOOTSTRAP points elsewhere."""

    bootstrap: str

    def _skip(self) -> None:
        pytest.skip("needs a broker this test session started (TICKSCALE_TEST_BOOTSTRAP is set)")

    def start(self) -> ExternalKafka:
        self._skip()
        return self

    def stop(self, timeout: float = 30.0, kill: bool = False) -> None:
        self._skip()

    def kill(self) -> None:
        self._skip()

    def restart(self, kill: bool = False) -> ExternalKafka:
        self._skip()
        return self

    async def arestart(self, kill: bool = False) -> ExternalKafka:
        self._skip()
        return self


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker | ExternalKafka]:
    global _OWNED_BROKER
    external = os.environ.get("TICKSCALE_TEST_BOOTSTRAP")
    if external:
        yield ExternalKafka(external)
        return
    # Under pytest's tmp dir so the broker's server.log of the last few runs is
    # kept for post-mortems without anyone having to ask for it.
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    broker.start()
    _OWNED_BROKER = broker
    try:
        yield broker
    finally:
        _OWNED_BROKER = None
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka: KafkaBroker | ExternalKafka) -> str:
    return kafka.bootstrap


@pytest.fixture
def kafka_broker(kafka: KafkaBroker | ExternalKafka) -> KafkaBroker:
    """The session broker, for tests that stop/kill/restart it."""
    if not isinstance(kafka, KafkaBroker):
        pytest.skip("needs a broker this test session started (TICKSCALE_TEST_BOOTSTRAP is set)")
    return kafka


@pytest.fixture(autouse=True)
def _kafka_still_up() -> Iterator[None]:
    """Bring the session broker back if the previous test left it down.

    A failing broker-bounce test would otherwise fail every test after it.
    Looks at the module global instead of requesting ``kafka`` so tests that
    never touch Kafka don't pay for a broker start.
    """
    broker = _OWNED_BROKER
    if broker is not None and not broker.running:
        broker.start()
    yield


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; use ``redis_server`` in tests."""
    server = RedisServer(work_dir=tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(redis_session: RedisServer) -> RedisServer:
    """The session Redis, running and empty. Tests may stop()/start() it."""
    import redis

    redis_session.start()  # no-op unless a previous test left it stopped
    client = redis.Redis.from_url(redis_session.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_session


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


def _slug(name: str) -> str:
    # Kafka allows [a-zA-Z0-9._-] up to 249 chars; keep the test name readable
    # in broker logs and kafka-consumer-groups output, then make it unique.
    return re.sub(r"[^a-zA-Z0-9-]+", "-", name).strip("-")[:60]


@pytest.fixture
async def make_topics(
    request: pytest.FixtureRequest, kafka_bootstrap: str
) -> AsyncIterator[MakeTopics]:
    """Factory: ``ts = await make_topics(raw_partitions=4)``; topics are deleted afterwards."""
    created: list[TopicSet] = []

    async def factory(
        raw_partitions: int = 4,
        ticks_partitions: int | None = None,
        deadletter_partitions: int = 1,
        configs: dict[str, str] | None = None,
    ) -> TopicSet:
        prefix = f"t-{_slug(request.node.name)}-{uuid.uuid4().hex[:8]}"
        ts = TopicSet(
            bootstrap=kafka_bootstrap,
            prefix=prefix,
            raw_partitions=raw_partitions,
            ticks_partitions=ticks_partitions or raw_partitions,
            deadletter_partitions=deadletter_partitions,
        )
        specs = {
            ts.raw: ts.raw_partitions,
            ts.ticks: ts.ticks_partitions,
            ts.deadletter: ts.deadletter_partitions,
        }
        ts.names = list(specs)
        await ensure_topics(kafka_bootstrap, specs, configs=configs)
        created.append(ts)
        return ts

    yield factory

    names = [n for ts in created for n in ts.names]
    if names and (_OWNED_BROKER is None or _OWNED_BROKER.running):
        # Best effort: a leftover topic only costs disk in a throwaway broker,
        # and must not turn a passing test into an error.
        with contextlib.suppress(Exception):
            await delete_topics(kafka_bootstrap, names, timeout_s=10)


@pytest.fixture
async def topics(request: pytest.FixtureRequest, make_topics: MakeTopics) -> TopicSet:
    """raw/ticks/deadletter topics + group for this test.

    Raw partition count defaults to 4; override with
    ``@pytest.mark.parametrize("topics", [8], indirect=True)``.
    """
    raw_partitions: int = getattr(request, "param", 4)
    return await make_topics(raw_partitions=raw_partitions)


@pytest.fixture(scope="module")
def rollout_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(good, faulty) second versions of the image under test (tests/rollout_utils.py)."""
    from tests.rollout_utils import build_images

    good, faulty = build_images(tmp_path_factory.mktemp("images"))
    yield good, faulty
    docker("rmi", "-f", good, faulty, check=False)


@pytest.fixture(scope="module")
def swarm() -> Iterator[None]:
    """This engine as a swarm manager: made a one-node swarm for the module if it was not
    one, and returned to its old state after."""
    state, manager = swarm_state()
    if state == "active":
        if not manager:
            pytest.skip("the engine is a swarm worker, not a manager")
        yield
        return
    if state != "inactive":
        pytest.skip(f"swarm state {state!r}")
    r = docker("swarm", "init", "--advertise-addr", "127.0.0.1", check=False)
    if r.returncode != 0:
        pytest.skip(f"`docker swarm init` failed: {r.stderr.strip()}")
    try:
        yield
    finally:
        # Only because this fixture made the engine a swarm.
        docker("swarm", "leave", "--force", check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB file system of its own, to fill (a full disk, for real)."""
    if os.geteuid() != 0:
        pytest.skip("fills a small tmpfs, which needs root to mount")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)
