"""`tickscale up` next to a broker and Redis it did not start: it deletes nothing of theirs
unless told to with --reset, and a reset drops the handlers' consumer group with the topics
(real broker and Redis, started here rather than by up)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata

from core import constants as c
from tests.pipeline_utils import holding
from tickscale.localstack import KafkaBroker, RedisServer, ensure_topics
from tickscale.localstack.net import free_port

# Not md.*: up must never delete it, with or without --reset.
OTHER = "someone-elses.topic"
# A partition the day (2 partitions) never writes a snapshot for.
SNAPSHOT = c.REDIS_BOOK_SNAPSHOT + "feed-handlers:md.raw:7"


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KafkaBroker, RedisServer]]:
    """A broker and Redis on their own ports, as another program would have left them."""
    broker = KafkaBroker(tmp_path_factory.mktemp("foreign-kafka")).start()
    server = RedisServer(work_dir=tmp_path_factory.mktemp("foreign-redis")).start()
    try:
        yield broker, server
    finally:
        server.stop()
        broker.stop()


async def _seed(bootstrap: str, redis_url: str) -> None:
    """Yesterday's day: md.* topics with a record, the group's committed offsets, a snapshot."""
    await ensure_topics(bootstrap, {c.RAW_TOPIC: 1, c.TICKS_TOPIC: 1, c.DEADLETTER_TOPIC: 1,
                                    OTHER: 1})  # fmt: skip
    prod = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await prod.start()
    try:
        await prod.send_and_wait(c.RAW_TOPIC, b"yesterday")
    finally:
        await prod.stop()
    # Committed offsets of the handlers' group, on a topic up does not reset: they
    # disappear only if the group itself is deleted.
    cons = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=c.HANDLER_GROUP,
                            enable_auto_commit=False)  # fmt: skip
    await cons.start()
    try:
        cons.assign([TopicPartition(OTHER, 0)])
        await cons.commit({TopicPartition(OTHER, 0): OffsetAndMetadata(5, "")})
    finally:
        await cons.stop()
    r = redis.Redis.from_url(redis_url)
    try:
        r.set(SNAPSHOT, b"yesterday's book")
    finally:
        r.close()


async def _state(bootstrap: str, redis_url: str) -> dict[str, object]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics = set(await admin.list_topics())
        offsets = await admin.list_consumer_group_offsets(c.HANDLER_GROUP)
    finally:
        await admin.close()
    r = redis.Redis.from_url(redis_url)
    try:
        snapshot = r.get(SNAPSHOT)
    finally:
        r.close()
    return {
        "topics": topics & {c.RAW_TOPIC, c.TICKS_TOPIC, c.DEADLETTER_TOPIC, OTHER},
        "group_offsets": {tp.topic: o.offset for tp, o in offsets.items()},
        "snapshot": snapshot,
    }


async def _raw_end(bootstrap: str) -> int:
    cons = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await cons.start()
    try:
        tp = TopicPartition(c.RAW_TOPIC, 0)
        return int((await cons.end_offsets([tp]))[tp])
    finally:
        await cons.stop()


def _up(
    state: Path, kafka_port: int, redis_port: int, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tickscale", "up", "--full-day", "--symbols", "5", "--from", "09:30",
         "--to", "09:31", "--speed", "max", "--handlers", "1", "--max-handlers", "1",
         "--partitions", "2", "--kafka-port", str(kafka_port), "--redis-port", str(redis_port),
         "--metrics-port", str(free_port()), "--scaler-port", str(free_port()),
         "--state-dir", str(state), *args],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.slow
async def test_up_refuses_to_reset_what_it_did_not_start(
    foreign: tuple[KafkaBroker, RedisServer], tmp_path: Path
) -> None:
    broker, server = foreign
    await _seed(broker.bootstrap, server.url)
    before = await _state(broker.bootstrap, server.url)
    assert before["group_offsets"] == {OTHER: 5} and before["snapshot"], before

    r = await asyncio.to_thread(_up, tmp_path / "up", broker.port, server.port)
    assert r.returncode == 2, r.stdout + r.stderr
    assert (
        f"error: a broker already listens on 127.0.0.1:{broker.port} and up did not start it; "
        "pass --reset to delete its md.* topics and the handlers' consumer group, or stop it"
    ) in r.stderr.splitlines(), r.stderr
    assert "Traceback" not in r.stderr
    assert await _state(broker.bootstrap, server.url) == before
    assert await _raw_end(broker.bootstrap) == 1  # yesterday's record is still there

    # Only Redis is someone else's: refused before up starts a broker of its own.
    state = tmp_path / "up-redis"
    r = await asyncio.to_thread(_up, state, free_port(), server.port)
    assert r.returncode == 2, r.stdout + r.stderr
    assert (
        f"error: Redis already listens on 127.0.0.1:{server.port} and up did not start it; "
        "pass --reset to delete its book snapshots, or stop it"
    ) in r.stderr.splitlines(), r.stderr
    assert not (state / "kafka").exists() and not holding(state)
    assert await _state(broker.bootstrap, server.url) == before


@pytest.mark.slow
async def test_up_reset_deletes_the_topics_group_and_snapshots(
    foreign: tuple[KafkaBroker, RedisServer], tmp_path: Path
) -> None:
    broker, server = foreign
    await _seed(broker.bootstrap, server.url)
    state = tmp_path / "up"
    r = await asyncio.to_thread(_up, state, broker.port, server.port, "--reset")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "missing=0 duplicated=0 reordered=0 checksum_mismatch=0" in out
    after = await _state(broker.bootstrap, server.url)
    # The group was deleted (its offsets on the other topic went with it) and the
    # day's handlers committed afresh on the new md.raw only.
    assert set(after["group_offsets"]) == {c.RAW_TOPIC}, after  # type: ignore[arg-type]
    assert after["snapshot"] is None
    assert OTHER in after["topics"]  # type: ignore[operator]
    assert not holding(state)
