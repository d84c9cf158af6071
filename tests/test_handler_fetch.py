"""The handler's top-up fetch, on the real broker: records join a batch whole, once, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from ingest.handler.partition import unseen
from ingest.handler.service import FeedHandler
from ingest.handler.settings import HandlerSettings
from ingest.manifest import Manifest
from ingest.verify import verify
from tests.pipeline_utils import json_trades, run_replay
from tickscale.localstack.topics import MakeTopics

PER_PARTITION = 40
Batches = dict[TopicPartition, list[Any]]


async def _fill(bootstrap: str, topic: str, partitions: int) -> None:
    # One record per produce request, so every record is its own batch on the
    # broker and a small fetch size splits the log across several fetches.
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        for p in range(partitions):
            for i in range(PER_PARTITION):
                await producer.send_and_wait(topic, b"x" * 900 + str(i).encode(), partition=p)
    finally:
        await producer.stop()


async def _consumer(bootstrap: str, tps: list[TopicPartition]) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4096,  # a few records per partition per fetch
    )
    await consumer.start()
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, 0)
    return consumer


def _offsets(batches: Batches) -> dict[int, list[int]]:
    return {tp.partition: [r.offset for r in recs] for tp, recs in batches.items()}


async def test_top_up_appends_the_next_fetch_in_offset_order(make_topics: MakeTopics) -> None:
    ts = await make_topics(raw_partitions=2)
    await _fill(ts.bootstrap, ts.raw, 2)
    tps = [TopicPartition(ts.raw, p) for p in range(2)]
    h = FeedHandler(HandlerSettings(bootstrap=ts.bootstrap, fetch_topup_ms=1000))
    consumer = await _consumer(ts.bootstrap, tps)
    try:
        polled: Batches = {}
        while not polled:
            polled = await consumer.getmany(timeout_ms=5000)
        first = {tp: len(recs) for tp, recs in polled.items()}
        got = await h._top_up(consumer, dict(polled))
    finally:
        await consumer.stop()
    assert sum(len(r) for r in got.values()) > sum(first.values())
    for p, offs in _offsets(got).items():
        # Each partition's records continue where the poll's ended: no gap, no repeat.
        assert offs == list(range(len(offs))), (p, offs)


async def test_top_up_keeps_a_full_batch_as_it_is(make_topics: MakeTopics) -> None:
    ts = await make_topics(raw_partitions=1)
    await _fill(ts.bootstrap, ts.raw, 1)
    consumer = await _consumer(ts.bootstrap, [TopicPartition(ts.raw, 0)])
    try:
        polled: Batches = {}
        while not polled:
            polled = await consumer.getmany(timeout_ms=5000)
        n = sum(len(r) for r in polled.values())
        h = FeedHandler(HandlerSettings(bootstrap=ts.bootstrap, max_batch=n))
        got = await h._top_up(consumer, dict(polled))
        assert _offsets(got) == _offsets(polled)
        # Nothing was taken from the consumer: the next poll starts right after.
        nxt: Batches = {}
        while not nxt:
            nxt = await consumer.getmany(timeout_ms=5000)
        assert next(iter(_offsets(nxt).values()))[0] == n
    finally:
        await consumer.stop()


class _RebalancingConsumer:
    """A rebalance landing inside the top-up's wait: timing no real group gives on demand."""

    def __init__(self, real: AIOKafkaConsumer, handler: FeedHandler) -> None:
        self.real = real
        self.handler = handler

    async def getmany(self, **kw: Any) -> Batches:
        self.handler.rebalances += 1
        got: Batches = await self.real.getmany(**kw)
        return got


async def _top_up_through(
    make_topics: MakeTopics, wrap: Callable[[AIOKafkaConsumer, FeedHandler, TopicPartition], Any]
) -> tuple[int, Batches]:
    """Fill one partition, poll it, then top the poll up through ``wrap``'s consumer.
    Returns the number of records polled and the topped-up batch."""
    ts = await make_topics(raw_partitions=1)
    await _fill(ts.bootstrap, ts.raw, 1)
    tp = TopicPartition(ts.raw, 0)
    h = FeedHandler(HandlerSettings(bootstrap=ts.bootstrap, fetch_topup_ms=1000))
    consumer = await _consumer(ts.bootstrap, [tp])
    try:
        polled: Batches = {}
        while not polled:
            polled = await consumer.getmany(timeout_ms=5000)
        return len(polled[tp]), await h._top_up(wrap(consumer, h, tp), dict(polled))
    finally:
        await consumer.stop()


async def test_top_up_drops_a_poll_that_predates_a_rebalance(make_topics: MakeTopics) -> None:
    n, got = await _top_up_through(make_topics, lambda c, h, _: _RebalancingConsumer(c, h))
    # Only what was fetched after the rebalance is returned; the poll's records
    # are neither processed stale nor glued in front of the later ones.
    assert got and all(r.offset >= n for recs in got.values() for r in recs)


class _SeekingConsumer:
    """An assignment callback's seek back to the committed offset inside the top-up's wait."""

    def __init__(self, real: AIOKafkaConsumer, tp: TopicPartition) -> None:
        self.real = real
        self.tp = tp

    async def getmany(self, **kw: Any) -> Batches:
        self.real.seek(self.tp, 0)
        got: Batches = await self.real.getmany(**kw)
        return got


async def test_top_up_after_a_seek_back_keeps_one_copy(make_topics: MakeTopics) -> None:
    _, got = await _top_up_through(make_topics, lambda c, _, tp: _SeekingConsumer(c, tp))
    offs = _offsets(got)[0]
    assert offs == list(range(len(offs))), offs


def test_a_batch_never_applies_an_offset_twice() -> None:
    recs = [
        ConsumerRecord("t", 0, o, 0, 0, None, b"", 0, 0, 0, ()) for o in (3, 4, 5, 4, 5, 6, 2, 7)
    ]
    assert [r.offset for r in unseen(recs, 4)] == [4, 5, 6, 7]
    assert unseen(recs, 8) == []


class _SlowRestore(FeedHandler):
    """A partition whose restore takes a while, as a long replay from a snapshot does.

    The consumer marks the rebalance done before it runs the assignment
    callback, so its fetcher is already fetching (and a poll already
    returning) what the callback's seek will fetch once more.
    """

    async def open_worker(self, tp: TopicPartition) -> None:
        await asyncio.sleep(0.5)
        await super().open_worker(tp)


async def test_records_polled_during_a_slow_restore_are_processed_once(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    ts = await make_topics(raw_partitions=1)
    feed = tmp_path / "feed.jsonl"
    feed.write_bytes(b"\n".join(orjson.dumps(t) for t in json_trades("BTC-USD", 50)) + b"\n")
    manifest = tmp_path / "m.json"
    run_replay(ts, manifest, "--source", "jsonl", "--file", str(feed), "--speed", "max")
    expected = Manifest.read(manifest)
    assert expected.symbols["BTC-USD"].ticks == 50
    h = _SlowRestore(
        HandlerSettings(
            bootstrap=ts.bootstrap,
            in_topic=ts.raw,
            out_topic=ts.ticks,
            deadletter_topic=ts.deadletter,
            group=ts.group,
            metrics_port=0,
            fetch_topup_ms=1000,  # the top-up's wait spans the callback's seek
        )
    )
    async with h:
        task = asyncio.create_task(h.run())
        try:
            res = await verify(ts.bootstrap, ts.ticks, expected, timeout_s=30)
        finally:
            h.request_stop()
            await task
    assert (res.ticks_read, res.summary_line()) == (
        50,
        "missing=0 duplicated=0 reordered=0 checksum_mismatch=0",
    )
    assert h.meter.messages == 50
