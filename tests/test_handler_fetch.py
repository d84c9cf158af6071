"""The handler's top-up fetch, on the real broker: records join a batch whole and in order."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ingest.handler.service import FeedHandler
from ingest.handler.settings import HandlerSettings
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


async def test_top_up_drops_a_poll_that_predates_a_rebalance(make_topics: MakeTopics) -> None:
    ts = await make_topics(raw_partitions=1)
    await _fill(ts.bootstrap, ts.raw, 1)
    tp = TopicPartition(ts.raw, 0)
    h = FeedHandler(HandlerSettings(bootstrap=ts.bootstrap, fetch_topup_ms=1000))
    consumer = await _consumer(ts.bootstrap, [tp])
    try:
        polled: Batches = {}
        while not polled:
            polled = await consumer.getmany(timeout_ms=5000)
        n = len(polled[tp])
        got = await h._top_up(_RebalancingConsumer(consumer, h), dict(polled))  # type: ignore[arg-type]
    finally:
        await consumer.stop()
    # Only what was fetched after the rebalance is returned; the poll's records
    # are neither processed stale nor glued in front of the later ones.
    assert got and all(r.offset >= n for recs in got.values() for r in recs)
