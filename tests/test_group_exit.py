"""A handler told it is being replaced leaves in its replacement's rebalance instead of
rejoining it (ingest.handler.group_exit), against the real broker."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from redis.asyncio import Redis

from core.constants import LEAVE_KEY_FIELD, REDIS_HANDLER_STATS
from ingest.handler.service import FeedHandler
from ingest.handler.settings import HandlerSettings
from scaler.backends.base import HandlerInstance
from scaler.handover import announce
from tickscale.localstack.topics import MakeTopics

PARTITIONS = 4


class _Record(ConsumerRebalanceListener):
    def __init__(self) -> None:
        self.assigned: list[set[int]] = []

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned.append({tp.partition for tp in assigned})


async def _until(what: str, cond: object, within_s: float) -> None:
    async with asyncio.timeout(within_s):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.1)


async def _until_async(cond: object, within_s: float) -> None:
    async with asyncio.timeout(within_s):
        while not await cond():  # type: ignore[operator]
            await asyncio.sleep(0.1)


class _CannotSignal:
    """A backend that cannot signal one handler (as Swarm): the announcement goes
    through Redis."""

    async def announce_replacement(self, ids: list[str]) -> list[str]:
        return []


@pytest.mark.parametrize("told_by", ["signal", "redis"])
async def test_a_replaced_handler_leaves_in_its_replacements_rebalance(
    make_topics: MakeTopics, redis_url: str, told_by: str
) -> None:
    """Nothing stops the old handler here: its own heartbeat learns of the rebalance the
    new member's join opened, and it leaves then. The new member's first assignment is
    every partition, and it is never handed a second: one rebalance for the change (had
    the old one rejoined, the new one would get half, then all once the old one left).
    Told by its signal, or by its leave key in Redis (scaler.handover.announce)."""
    ts = await make_topics(raw_partitions=PARTITIONS)
    hid = f"old-{ts.group}"
    s = HandlerSettings(
        bootstrap=ts.bootstrap, in_topic=ts.raw, out_topic=ts.ticks,
        deadletter_topic=ts.deadletter, group=ts.group, handler_id=hid,
        metrics_host="127.0.0.1", metrics_port=0,
        redis_url=redis_url if told_by == "redis" else None,
    )  # fmt: skip
    seen = _Record()
    new = AIOKafkaConsumer(
        bootstrap_servers=ts.bootstrap, group_id=ts.group, client_id="new",
        enable_auto_commit=False, isolation_level="read_committed",
    )  # fmt: skip
    try:
        async with FeedHandler(s) as old:
            run = asyncio.create_task(old.run())
            await _until("the old handler's partitions", lambda: len(old.workers) == PARTITIONS, 60)
            if told_by == "signal":
                old.replacement.announce()
            else:
                r = Redis.from_url(redis_url)
                try:
                    stats = REDIS_HANDLER_STATS + hid
                    await _until_async(lambda: r.hget(stats, LEAVE_KEY_FIELD), 30)
                    me = HandlerInstance("task-1", hid, "running", 0.0)
                    told = await announce(_CannotSignal(), r, [me])  # type: ignore[arg-type]
                    assert told == ["task-1"]
                finally:
                    await r.aclose()
                await _until("the leave key read", lambda: old.replacement.announced_at, 10)
            new.subscribe([ts.raw], listener=seen)
            # start() returns once the new member has joined, which takes the old one's
            # leave: meanwhile the old handler's run() ends by itself (nobody asked it to).
            starting = asyncio.create_task(new.start())
            await asyncio.wait_for(asyncio.shield(run), 60)
        # Stopped as the handler's command stops it once run() returns; its revoke callback
        # then sends LeaveGroup. Had it been left to time out of the rebalance instead, the
        # new member would wait for that (minutes), not seconds.
        assert old.replacement.left
        await asyncio.wait_for(starting, 20)
        await _until("the new member's assignment", lambda: seen.assigned, 20)
        # Longer than a heartbeat interval (3 s): a second rebalance would show by then.
        for _ in range(25):
            await new.getmany(timeout_ms=200)
        assert seen.assigned == [set(range(PARTITIONS))], seen.assigned
    finally:
        await new.stop()
