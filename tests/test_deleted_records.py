"""Raw records deleted from the log (retention, or deleted by hand) before the handlers
used them: a hole that cannot be filled, so it must be said and counted, never
passed over in silence.

Real handler processes and the real broker; the records are deleted with the
broker's DeleteRecords request, as retention or an operator would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from tests.pipeline_utils import HandlerProc, run_replay, run_verify, summary
from tickscale.localstack.topics import MakeTopics, TopicSet

DAY = "2024-11-25"


async def _log_end(ts: TopicSet, tp: TopicPartition) -> int:
    c = AIOKafkaConsumer(bootstrap_servers=ts.bootstrap)
    await c.start()
    try:
        return (await c.end_offsets([tp]))[tp]
    finally:
        await c.stop()


async def _committed(ts: TopicSet, tp: TopicPartition) -> int | None:
    admin = AIOKafkaAdminClient(bootstrap_servers=ts.bootstrap)
    await admin.start()
    try:
        got = (await admin.list_consumer_group_offsets(ts.group)).get(tp)
        return got.offset if got is not None and got.offset >= 0 else None
    finally:
        await admin.close()


async def _delete_before(ts: TopicSet, tp: TopicPartition, offset: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=ts.bootstrap)
    await admin.start()
    try:
        low = await admin.delete_records({tp: RecordsToDelete(offset)}, timeout_ms=10_000)
        assert low[tp] == offset, low
    finally:
        await admin.close()


async def _wait_committed(ts: TopicSet, tp: TopicPartition, offset: int, h: HandlerProc) -> None:
    deadline = time.monotonic() + 90
    while await _committed(ts, tp) != offset:
        assert time.monotonic() < deadline, h.log()
        await asyncio.sleep(0.5)


def _unprocessed(tp: TopicPartition, first: int, start: int) -> str:
    """What the handler says of offsets ``first`` .. ``start - 1`` deleted unprocessed."""
    return (
        f"{tp}: offsets {first} to {start - 1} were deleted from the log before the group "
        f"processed them: {start - first} records"
    )


@pytest.mark.slow
async def test_records_deleted_before_the_handler_used_them_are_said_and_counted(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    ts = await make_topics(raw_partitions=1)
    tp = TopicPartition(ts.raw, 0)
    first = tmp_path / "first.json"
    run_replay(ts, first, "--symbols", "6", "--seed", "3", "--date", DAY,
               "--from", "09:28", "--to", "09:32", "--speed", "max")  # fmt: skip
    a = HandlerProc(ts, tmp_path, "a")
    try:
        rc, out = run_verify(ts, first)
        assert rc == 0 and summary(out)["missing"] == 0, out[-3000:]
        assert a.terminate() == 0
    finally:
        a.close()
    committed = await _committed(ts, tp)
    assert committed == await _log_end(ts, tp) and committed, committed

    # The rest of the day arrives while no handler runs, and the log's head, the
    # processed records and half the unprocessed ones, is deleted before one does.
    run_replay(ts, tmp_path / "second.json", "--symbols", "6", "--seed", "3", "--date", DAY,
               "--from", "09:32", "--to", "09:36", "--speed", "max")  # fmt: skip
    end = await _log_end(ts, tp)
    start = committed + (end - committed) // 2
    assert committed < start < end
    await _delete_before(ts, tp, start)

    # A long session: the second half stops this handler without a rebalance.
    b = HandlerProc(ts, tmp_path, "b", extra=["--session-timeout-ms", "60000"])
    try:
        await _wait_committed(ts, tp, end, b)
        log = b.log_path.read_text()
        # The restore rebuilt the book without every record before the committed offset.
        assert (
            f"{tp}: the book is rebuilt at offset {committed} without offsets 0 to "
            f"{committed - 1}" in log
        ), log[-4000:]
        # The records between the committed offset and the new log start were never
        # processed: their ticks are missing, and the handler says how many.
        assert _unprocessed(tp, committed, start) in log, log[-4000:]
        name = "tickscale_handler_raw_records_deleted_total"
        assert b.metric(name, 'when="before_restore"') == committed
        assert b.metric(name, 'when="before_processing"') == start - committed
        # Everything still in the log is processed, once.
        assert b.metric("tickscale_handler_messages_in_total") == end - start

        # A running handler overtaken by the deletion: stopped, records arrive and
        # their first part is deleted, and it goes on from where the log now starts.
        os.kill(b.proc.pid, signal.SIGSTOP)
        try:
            run_replay(ts, tmp_path / "third.json", "--symbols", "6", "--seed", "3",
                       "--date", DAY, "--from", "09:36", "--to", "09:40",
                       "--speed", "max")  # fmt: skip
            end2 = await _log_end(ts, tp)
            start2 = end + (end2 - end) // 3
            await _delete_before(ts, tp, start2)
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
        await _wait_committed(ts, tp, end2, b)
        log = b.log_path.read_text()
        assert _unprocessed(tp, end, start2) in log, log[-4000:]
        assert b.metric(name, 'when="before_processing"') == start - committed + start2 - end
        assert b.metric("tickscale_handler_messages_in_total") == end - start + end2 - start2
        assert b.metric("tickscale_handler_rebalances_total") == 1
        assert "Traceback" not in log
        # And the ledger shows the hole (md.ticks also holds the other windows' ticks,
        # so only the missing count is the second window's own).
        rc, out = run_verify(ts, tmp_path / "second.json")
        assert rc == 1 and summary(out)["missing"] > 0, out[-3000:]
    finally:
        b.close()
