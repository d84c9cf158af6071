"""State belongs to one incarnation of a topic: after the raw topic is deleted and
created again under the same name, committed offsets and Redis snapshots of the
old one are ignored, and the new log is processed from its start.

Real handler processes, the real broker and Redis; the ledger is checked with
``tickscale verify``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from core.incarnation import (
    judge_committed,
    metadata_topic_id,
    offset_metadata,
    topic_id,
)
from ingest.handler.fencing import Committed, fetch_committed
from ingest.handler.redis_sink import snapshot_key
from tests.pipeline_utils import HandlerProc, run_replay, run_verify, summary
from tickscale.localstack import delete_topics, ensure_topics
from tickscale.localstack.topics import MakeTopics, TopicSet

DAY = "2024-11-25"
ZERO = {"missing": 0, "duplicated": 0, "reordered": 0, "checksum_mismatch": 0}


def _assert_exact(rc: int, out: str) -> None:
    assert summary(out) == ZERO, out[-3000:]
    assert rc == 0, out[-3000:]


def _day(ts: TopicSet, manifest: Path, seed: int, start: str, end: str) -> None:
    run_replay(
        ts, manifest, "--symbols", "6", "--seed", str(seed), "--date", DAY,
        "--from", start, "--to", end, "--speed", "max",
    )  # fmt: skip


async def _consumer(ts: TopicSet, group: str | None = None) -> AIOKafkaConsumer:
    c = AIOKafkaConsumer(bootstrap_servers=ts.bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    return c


async def _committed(ts: TopicSet) -> dict[int, Committed]:
    c = await _consumer(ts)
    try:
        return {
            p: await fetch_committed(c, ts.group, TopicPartition(ts.raw, p), require_stable=True)
            for p in range(ts.raw_partitions)
        }
    finally:
        await c.stop()


async def _topic_id(ts: TopicSet) -> str | None:
    c = await _consumer(ts)
    try:
        return await topic_id(c, ts.raw)
    finally:
        await c.stop()


async def _log_ends(ts: TopicSet) -> dict[int, int]:
    c = await _consumer(ts)
    try:
        tps = [TopicPartition(ts.raw, p) for p in range(ts.raw_partitions)]
        return {tp.partition: end for tp, end in (await c.end_offsets(tps)).items()}
    finally:
        await c.stop()


async def _recreate(ts: TopicSet) -> None:
    """Delete the test's topics and create them again under the same names, as a
    second ``tickscale up`` does with md.raw."""
    await delete_topics(ts.bootstrap, ts.names, timeout_s=30)
    admin = AIOKafkaAdminClient(bootstrap_servers=ts.bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + 60
        while set(ts.names) & set(await admin.list_topics()):
            assert time.monotonic() < deadline, "topics still listed after deletion"
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    await ensure_topics(
        ts.bootstrap,
        {ts.raw: ts.raw_partitions, ts.ticks: ts.ticks_partitions, ts.deadletter: 1},
    )
    # The broker drops a deleted topic's committed offsets (soon after the deletion).
    deadline = time.monotonic() + 60
    while any(c.offset is not None for c in (await _committed(ts)).values()):
        assert time.monotonic() < deadline, "the group kept the deleted topic's offsets"
        await asyncio.sleep(0.5)


async def _late_commit(ts: TopicSet, offsets: dict[int, Committed]) -> None:
    """Put the old incarnation's offsets back, as a commit of the old day that lands
    after the recreation does (a handler or an open transaction of that day finishing
    late): the state users found, beyond the new log's end."""
    c = await _consumer(ts, ts.group)
    try:
        tps = {p: TopicPartition(ts.raw, p) for p in offsets}
        c.assign(list(tps.values()))
        await c.commit(
            {tps[p]: (got.offset, got.metadata) for p, got in offsets.items() if got.offset}
        )
    finally:
        await c.stop()


def test_offset_verdicts() -> None:
    meta = offset_metadata("tickscale.g.h1", "TOPIC-A")
    assert metadata_topic_id(meta) == "TOPIC-A"
    assert metadata_topic_id("tickscale.g.h1") is None  # committed before ids existed
    assert metadata_topic_id("{not json") is None
    assert judge_committed(None, "", "TOPIC-A", 10).offset is None
    assert judge_committed(7, meta, "TOPIC-A", 10).offset == 7
    assert judge_committed(10, meta, "TOPIC-A", 10).offset == 10
    other = judge_committed(7, offset_metadata("tickscale.g.h1", "TOPIC-B"), "TOPIC-A", 10)
    assert other.offset is None and "TOPIC-B" in other.foreign and "TOPIC-A" in other.foreign
    # Without an id in the metadata, only an offset past the log end gives it away.
    assert judge_committed(7, "tickscale.g.h1", "TOPIC-A", 10).offset == 7
    beyond = judge_committed(11, "tickscale.g.h1", "TOPIC-A", 10)
    assert beyond.offset is None and "beyond the log end 10" in beyond.foreign
    # A broker without topic ids: the offset check alone.
    assert judge_committed(7, meta, None, 10).offset == 7


async def test_a_broker_without_topic_ids_is_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker older than topic ids (Kafka 2.8) cannot be had here, so its answer is
    stood in for. The scaler asks at every poll: one warning, not one a poll."""
    from aiokafka.errors import IncompatibleBrokerVersion

    import core.incarnation as inc

    async def old_broker(consumer: object, topic: str) -> bytes | None:
        raise IncompatibleBrokerVersion("Metadata v12 is not supported")

    monkeypatch.setattr(inc, "raw_topic_id", old_broker)
    monkeypatch.setattr(inc, "_NO_IDS_SAID", set())
    nothing: Any = object()
    assert [await inc.topic_id(nothing, "md.raw") for _ in range(3)] == [None, None, None]
    said = [r for r in caplog.records if "gives no topic ids" in r.getMessage()]
    assert len(said) == 1, said


@pytest.mark.slow
async def test_offsets_of_a_deleted_topic_are_ignored(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    ts = await make_topics(raw_partitions=2)
    old = tmp_path / "old.json"
    _day(ts, old, 3, "09:28", "09:40")
    old_id = await _topic_id(ts)
    assert old_id
    a = HandlerProc(ts, tmp_path, "a")
    try:
        _assert_exact(*run_verify(ts, old))
        assert a.terminate() == 0
    finally:
        a.close()
    committed = await _committed(ts)
    assert all(c.offset for c in committed.values()), committed
    # The handler's commits name the incarnation of the topic they were made for.
    assert {metadata_topic_id(c.metadata) for c in committed.values()} == {old_id}

    await _recreate(ts)
    new_id = await _topic_id(ts)
    assert new_id and new_id != old_id
    await _late_commit(ts, committed)
    assert await _committed(ts) == committed

    new = tmp_path / "new.json"
    _day(ts, new, 5, "09:29", "09:32")  # a smaller day
    ends = await _log_ends(ts)
    assert all(ends[p] < committed[p].offset for p in ends if committed[p].offset), (
        ends,
        committed,
    )
    b = HandlerProc(ts, tmp_path, "b")
    try:
        # Every record of the new incarnation, nothing skipped, nothing twice.
        _assert_exact(*run_verify(ts, new))
        log = b.log_path.read_text()
        for p, got in committed.items():
            assert (
                f"{TopicPartition(ts.raw, p)}: ignoring the committed offset {got.offset}: "
                f"committed for topic id {old_id}, expected {new_id}" in log
            ), log[-3000:]
        assert b.terminate() == 0
    finally:
        b.close()
    after = await _committed(ts)
    assert {metadata_topic_id(c.metadata) for c in after.values()} == {new_id}
    assert {p: c.offset for p, c in after.items()} == ends


@pytest.mark.slow
async def test_a_snapshot_of_a_deleted_topic_is_ignored(
    make_topics: MakeTopics, tmp_path: Path, redis_url: str
) -> None:
    ts = await make_topics(raw_partitions=1)
    r = redis.Redis.from_url(redis_url)
    key = snapshot_key(ts.group, ts.raw, 0)
    old = tmp_path / "old.json"
    _day(ts, old, 3, "09:29", "09:31")
    old_id = await _topic_id(ts)
    a = HandlerProc(ts, tmp_path, "a", redis_url)
    try:
        _assert_exact(*run_verify(ts, old))
        assert a.terminate() == 0  # stop() saves the snapshot at the committed offset
    finally:
        a.close()
    snap = r.hgetall(key)
    old_offset = int(snap[b"offset"])
    assert old_offset > 0 and snap[b"topic_id"].decode() == old_id

    await _recreate(ts)
    new_id = await _topic_id(ts)
    new = tmp_path / "new.json"
    _day(ts, new, 5, "09:28", "09:36")  # a bigger day: the old snapshot lies within it
    end = (await _log_ends(ts))[0]
    assert end > old_offset
    # A handler without Redis processes the new day, leaving the old snapshot there.
    b = HandlerProc(ts, tmp_path, "b")
    try:
        _assert_exact(*run_verify(ts, new))
        assert b.terminate() == 0
    finally:
        b.close()
    assert r.hgetall(key) == snap
    # The next owner restores at the new day's committed offset, below which the
    # old snapshot's offset lies: it must replay instead of trusting it.
    c = HandlerProc(ts, tmp_path, "c", redis_url)
    try:
        c.wait_ready(120)
        log = c.log_path.read_text()
        assert (
            f"{TopicPartition(ts.raw, 0)}: ignoring the Redis snapshot at offset {old_offset}: "
            f"it is of topic "
            f"id {old_id}, expected {new_id}" in log
        ), log[-3000:]
        assert f"restored at offset {end} (snapshot 0, replayed {end})" in log, log[-3000:]
        assert c.terminate() == 0
    finally:
        c.close()
    snap = r.hgetall(key)
    assert int(snap[b"offset"]) == end and snap[b"topic_id"].decode() == new_id
    _assert_exact(*run_verify(ts, new, timeout_s=5))  # the restore published nothing


async def _records(ts: TopicSet, n: int) -> None:
    """``n`` records without headers into raw partition 0 (each one is dead-lettered)."""
    p = AIOKafkaProducer(bootstrap_servers=ts.bootstrap)
    await p.start()
    try:
        await asyncio.gather(*[await p.send(ts.raw, b"%d" % i, partition=0) for i in range(n)])
    finally:
        await p.stop()


@pytest.mark.slow
async def test_offsets_committed_without_a_topic_id(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    """Offsets committed before commits carried a topic id: one beyond the log end is
    ignored (it cannot be this log's), one within the log is trusted."""
    ts = await make_topics(raw_partitions=1)
    await _records(ts, 100)
    legacy = "tickscale.old.handler"  # the bare transactional id commits carried
    await _late_commit(ts, {0: Committed(500, legacy)})
    a = HandlerProc(ts, tmp_path, "a")
    try:
        a.wait_ready(120)
        deadline = time.monotonic() + 60
        while a.metric("tickscale_handler_messages_in_total") < 100:
            assert time.monotonic() < deadline, a.log()
            await asyncio.sleep(0.2)
        assert a.metric("tickscale_handler_messages_in_total") == 100
        log = a.log_path.read_text()
        assert (
            f"{TopicPartition(ts.raw, 0)}: ignoring the committed offset 500: committed offset "
            "500 is beyond the log end 100" in log
        ), log[-3000:]
        assert a.terminate() == 0
    finally:
        a.close()
    await _late_commit(ts, {0: Committed(40, legacy)})
    b = HandlerProc(ts, tmp_path, "b")
    try:
        b.wait_ready(120)
        deadline = time.monotonic() + 60
        while b.metric("tickscale_handler_messages_in_total") < 60:
            assert time.monotonic() < deadline, b.log()
            await asyncio.sleep(0.2)
        log = b.log_path.read_text()
        assert "ignoring the committed offset" not in log, log[-3000:]
        assert f"{TopicPartition(ts.raw, 0)} restored at offset 40" in log, log[-3000:]
        assert b.metric("tickscale_handler_messages_in_total") == 60
        assert b.terminate() == 0
    finally:
        b.close()
