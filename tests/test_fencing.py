"""Group fencing of the handler's transactions (KIP-447 requests), on the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from dataclasses import replace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import ProducerFenced
from aiokafka.structs import OffsetAndMetadata

from ingest import metrics
from ingest.handler.fencing import (
    Committed,
    FencedProducer,
    GroupFenced,
    GroupMetadata,
    Unstable,
    fetch_committed,
)
from ingest.handler.service import FeedHandler, transactional_id
from ingest.handler.settings import HandlerSettings
from tickscale.localstack.topics import MakeTopics, TopicSet


async def _member(ts: TopicSet, client_id: str = "member") -> AIOKafkaConsumer:
    """A member of the test's group, once it holds every raw partition it is given.

    A handler's client id is its handler id, which names its transactional id."""
    c = AIOKafkaConsumer(
        bootstrap_servers=ts.bootstrap,
        group_id=ts.group,
        client_id=client_id,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    c.subscribe([ts.raw])
    await c.start()
    while not c.assignment():
        await c.getmany(timeout_ms=200)
    return c


async def _producer(ts: TopicSet, txn_id: str) -> FencedProducer:
    # A transaction left open outlives every test, so only a fence ends it in one.
    p = FencedProducer(
        bootstrap_servers=ts.bootstrap, transactional_id=txn_id, transaction_timeout_ms=600_000
    )
    await p.start()
    return p


async def _begin(
    p: FencedProducer, ts: TopicSet, txn_id: str, tick: bytes, offset: int, meta: GroupMetadata
) -> None:
    """Open a transaction of ``p`` holding one tick and raw partition 0's offset."""
    await p.begin_transaction()
    await p.send(ts.ticks, tick, partition=0)
    await p.send_offsets_fenced(
        {TopicPartition(ts.raw, 0): OffsetAndMetadata(offset, txn_id)}, meta
    )


async def _committed_ticks(ts: TopicSet) -> list[bytes]:
    """Every tick a ``read_committed`` reader sees, once no transaction is open."""
    c = AIOKafkaConsumer(
        bootstrap_servers=ts.bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await c.start()
    try:
        tps = [TopicPartition(ts.ticks, p) for p in range(ts.ticks_partitions)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        end = await c.end_offsets(tps)
        out: list[bytes] = []
        left = {tp for tp in tps if end[tp] > 0}
        while left:
            for recs in (await c.getmany(timeout_ms=500)).values():
                out += [r.value for r in recs]
            left = {tp for tp in left if await c.position(tp) < end[tp]}
        return out
    finally:
        await c.stop()


async def _stable_committed(c: AIOKafkaConsumer, ts: TopicSet, tp: TopicPartition) -> Committed:
    """The committed offset once it is stable: the broker writes a committed
    transaction's markers after answering its EndTxn, so a fetch right after the
    commit may still find the offset pending."""
    for _ in range(100):
        try:
            return await fetch_committed(c, ts.group, tp, require_stable=True)
        except Unstable:
            await asyncio.sleep(0.1)
    raise AssertionError(f"{tp}: committed offset still unstable after 10 s")


async def test_only_the_current_generation_commits(make_topics: MakeTopics) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    gc.collect()  # what earlier tests left is theirs
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    ts = await make_topics(raw_partitions=2)
    tp = TopicPartition(ts.raw, 0)
    c = await _member(ts)
    txn_id = transactional_id(ts.group, "a")
    p = await _producer(ts, txn_id)
    try:
        meta = GroupMetadata.of(c, ts.group)
        await p.begin_transaction()
        await p.send(ts.ticks, b"kept", partition=0)
        await p.send_offsets_fenced({tp: OffsetAndMetadata(5, txn_id)}, meta)
        await p.commit_transaction()
        assert await _stable_committed(c, ts, tp) == Committed(5, txn_id)

        # What a zombie holds: the generation before the group's current one, or a
        # member id the group has dropped.
        for stale in (
            replace(meta, generation_id=meta.generation_id - 1),
            replace(meta, member_id=meta.member_id + "-gone"),
        ):
            await p.begin_transaction()
            await p.send(ts.ticks, b"refused", partition=0)
            with pytest.raises(GroupFenced):
                await p.send_offsets_fenced({tp: OffsetAndMetadata(9, txn_id)}, stale)
            # The handler's recovery: a new producer for the id, whose initialisation
            # makes the broker abort the refused transaction.
            with contextlib.suppress(Exception):
                await p.stop()
            p = await _producer(ts, txn_id)

        assert await _stable_committed(c, ts, tp) == Committed(5, txn_id)
        assert await _committed_ticks(ts) == [b"kept"]
        # A refused commit is an expected event for a zombie: the producers replaced
        # above leave no error behind that asyncio reports as never retrieved.
        gc.collect()
        assert [c["message"] for c in reported if isinstance(c.get("exception"), GroupFenced)] == []
    finally:
        loop.set_exception_handler(None)
        await p.stop()
        await c.stop()


async def test_a_commit_in_flight_holds_the_offset_unstable(make_topics: MakeTopics) -> None:
    ts = await make_topics(raw_partitions=1)
    tp = TopicPartition(ts.raw, 0)
    c = await _member(ts)
    txn_id = transactional_id(ts.group, "a")
    p = await _producer(ts, txn_id)
    try:
        await p.begin_transaction()
        await p.send(ts.ticks, b"t", partition=0)
        await p.send_offsets_fenced(
            {tp: OffsetAndMetadata(7, txn_id)}, GroupMetadata.of(c, ts.group)
        )
        with pytest.raises(Unstable):
            await fetch_committed(c, ts.group, tp, require_stable=True)
        # Without require_stable the broker answers with what was committed before.
        assert await fetch_committed(c, ts.group, tp, require_stable=False) == Committed(None, "")
        await p.commit_transaction()
        assert await _stable_committed(c, ts, tp) == Committed(7, txn_id)
    finally:
        await p.stop()
        await c.stop()


async def _fill_raw(ts: TopicSet, n: int) -> None:
    """Raw records for a restore to replay up to the committed offset."""
    raw = AIOKafkaProducer(bootstrap_servers=ts.bootstrap)
    await raw.start()
    try:
        for i in range(n):
            await raw.send_and_wait(ts.raw, b"raw %d" % i, partition=0)
    finally:
        await raw.stop()


def _next_owner_settings(ts: TopicSet) -> HandlerSettings:
    # Its member id sorts before "zz-live"'s, so the range assignor gives it partition 0.
    return HandlerSettings(
        bootstrap=ts.bootstrap,
        in_topic=ts.raw,
        out_topic=ts.ticks,
        deadletter_topic=ts.deadletter,
        group=ts.group,
        handler_id="next",
        metrics_host="127.0.0.1",
        metrics_port=0,
        fence_after_s=0.2,
    )


async def _start_offset_of_next_owner(ts: TopicSet, tp: TopicPartition) -> int | None:
    """The offset a new handler starts ``tp`` from (it holds the group's only partition)."""
    s = _next_owner_settings(ts)
    # Not run(): the group assigns the partition on start, and the worker's offset
    # is read before any batch could move it.
    async with FeedHandler(s) as h:
        async with asyncio.timeout(60):
            while tp not in h.workers:
                await asyncio.sleep(0.1)
        return h.workers[tp].committed


async def test_a_new_owner_fences_a_transaction_left_open(make_topics: MakeTopics) -> None:
    """An owner killed between its offset commit and its end of transaction leaves the
    offset pending until the transaction times out; the next owner fences it sooner."""
    ts = await make_topics(raw_partitions=1)
    tp = TopicPartition(ts.raw, 0)
    c = await _member(ts)
    await _fill_raw(ts, 10)
    dead_id = transactional_id(ts.group, "dead")
    dead = await _producer(ts, dead_id)
    meta = GroupMetadata.of(c, ts.group)
    await _begin(dead, ts, dead_id, b"committed", 3, meta)
    await dead.commit_transaction()
    await _begin(dead, ts, dead_id, b"left open", 8, meta)
    await c.stop()  # the owner is gone from the group; its transaction stays open

    fenced_before = metrics.STALE_TXN_FENCED._value.get()
    # It starts from the last committed offset, not the one left pending.
    assert await _start_offset_of_next_owner(ts, tp) == 3
    assert metrics.STALE_TXN_FENCED._value.get() == fenced_before + 1
    with pytest.raises(ProducerFenced):
        await dead.commit_transaction()
    with contextlib.suppress(Exception):
        await dead.stop()
    assert await _committed_ticks(ts) == [b"committed"]


async def test_the_holder_is_found_whoever_committed_last(make_topics: MakeTopics) -> None:
    """The open transaction is its holder's first commit of the partition, so the
    committed offset names another handler; and a member's open transaction is not
    the holder's and stays untouched."""
    ts = await make_topics(raw_partitions=1)
    tp = TopicPartition(ts.raw, 0)
    c = await _member(ts)
    await _fill_raw(ts, 10)
    meta = GroupMetadata.of(c, ts.group)
    old_id = transactional_id(ts.group, "old")
    old = await _producer(ts, old_id)
    await _begin(old, ts, old_id, b"committed", 3, meta)
    await old.commit_transaction()
    await old.stop()
    dead_id = transactional_id(ts.group, "dead")
    dead = await _producer(ts, dead_id)
    await _begin(dead, ts, dead_id, b"left open", 8, meta)
    await c.stop()

    # A member that stays in the group with a transaction open.
    live = await _member(ts, "zz-live")
    live_txn = await _producer(ts, transactional_id(ts.group, "zz-live"))
    try:
        await live_txn.begin_transaction()
        await live_txn.send(ts.ticks, b"live", partition=0)
        fenced_before = metrics.STALE_TXN_FENCED._value.get()
        assert await _start_offset_of_next_owner(ts, tp) == 3
        assert metrics.STALE_TXN_FENCED._value.get() == fenced_before + 1
        await live_txn.commit_transaction()
    finally:
        await live_txn.stop()
        await live.stop()
    with pytest.raises(ProducerFenced):
        await dead.commit_transaction()
    with contextlib.suppress(Exception):
        await dead.stop()
    assert sorted(await _committed_ticks(ts)) == [b"committed", b"live"]


async def test_a_member_is_never_fenced_and_stop_ends_the_wait(make_topics: MakeTopics) -> None:
    """A member's open transaction holding the partition's offset is waited for, not
    fenced, and SIGTERM's stop() ends that wait instead of waiting behind it."""
    ts = await make_topics(raw_partitions=1)
    tp = TopicPartition(ts.raw, 0)
    live = await _member(ts, "zz-live")
    live_id = transactional_id(ts.group, "zz-live")
    live_txn = await _producer(ts, live_id)
    h = FeedHandler(_next_owner_settings(ts))
    try:
        await _begin(live_txn, ts, live_id, b"live", 5, GroupMetadata.of(live, ts.group))
        fenced_before = metrics.STALE_TXN_FENCED._value.get()
        await h.start()
        assert h.consumer is not None
        async with asyncio.timeout(60):
            while tp not in h.consumer.assignment():
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # five fence checks
        assert tp not in h.workers
        async with asyncio.timeout(30):
            await h.stop()
        assert tp not in h.workers
        assert metrics.STALE_TXN_FENCED._value.get() == fenced_before
        await live_txn.commit_transaction()
    finally:
        await h.stop()  # a second stop() after the one above does nothing
        await live_txn.stop()
        await live.stop()
    assert await _committed_ticks(ts) == [b"live"]
