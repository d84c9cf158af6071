"""A handler told it is being replaced leaves in its replacement's rebalance instead of
rejoining it (ingest.handler.group_exit), against the real broker."""

from __future__ import annotations

import asyncio

import aiokafka
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from ingest.handler import group_exit
from ingest.handler.service import FeedHandler
from ingest.handler.settings import HandlerSettings
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


async def test_a_replaced_handler_leaves_in_its_replacements_rebalance(
    make_topics: MakeTopics,
) -> None:
    """Nothing stops the old handler here: its own heartbeat learns of the rebalance the
    new member's join opened, and it leaves then. The new member's first assignment is
    every partition, and it is never handed a second: one rebalance for the change (had
    the old one rejoined, the new one would get half, then all once the old one left)."""
    ts = await make_topics(raw_partitions=PARTITIONS)
    s = HandlerSettings(
        bootstrap=ts.bootstrap, in_topic=ts.raw, out_topic=ts.ticks,
        deadletter_topic=ts.deadletter, group=ts.group, handler_id="old",
        metrics_host="127.0.0.1", metrics_port=0,
    )  # fmt: skip
    seen = _Record()
    new = AIOKafkaConsumer(
        bootstrap_servers=ts.bootstrap, group_id=ts.group, client_id="new",
        enable_auto_commit=False, isolation_level="read_committed",
    )  # fmt: skip
    async with FeedHandler(s) as old:
        run = asyncio.create_task(old.run())
        await _until("the old handler's partitions", lambda: len(old.workers) == PARTITIONS, 60)
        old.replacement.announce()
        new.subscribe([ts.raw], listener=seen)
        await new.start()
        try:

            async def polled() -> None:
                while not run.done():
                    await new.getmany(timeout_ms=200)

            poll = asyncio.create_task(polled())
            # It stops by itself: nobody asked run() to end.
            await asyncio.wait_for(asyncio.shield(run), 60)
            await poll
            assert old.replacement.left
            await _until("the new member's assignment", lambda: seen.assigned, 30)
            # Longer than a heartbeat interval (3 s): a second rebalance would show by then.
            for _ in range(25):
                await new.getmany(timeout_ms=200)
            assert seen.assigned == [set(range(PARTITIONS))], seen.assigned
        finally:
            await new.stop()


def test_the_module_names_the_client_version_it_was_written_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group_exit.check_client()  # the installed one
    monkeypatch.setattr(aiokafka, "__version__", "0.15.0")
    with pytest.raises(RuntimeError, match=r"aiokafka 0\.15\.0 is installed"):
        group_exit.check_client()
