"""A partition's state rebuilt at its committed offset: the newest usable Redis snapshot at
or below it, then a silent replay of the raw records up to it (see partition.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer

from core.aiokafka_internals import stop_consumer
from core.secrets import kafka_auth
from ingest import metrics
from ingest.handler.partition import PartitionWorker, RestoreError, RestoreStopped
from ingest.normalize import Normalizer

log = logging.getLogger(__name__)


async def restore(
    w: PartitionWorker,
    bootstrap: str,
    committed: int | None,
    topic_id: str | None = None,
    stopping: asyncio.Event | None = None,
) -> None:
    """Rebuild state at the committed offset: snapshot, then silent replay.

    :param committed: the offset to restore at, already checked to belong to
        this incarnation of the topic (None: the log start)
    :param topic_id: the input topic's id; a snapshot stamped with another is
        from a deleted topic of the same name and is ignored
    :param stopping: set when the handler stops; the replay then gives up
        (:class:`RestoreStopped`) instead of holding the stop back
    """
    t0 = time.monotonic()
    target = committed or 0
    start = 0
    if w.sink is not None:
        w.sink.bind(w.snap_key, topic_id)
    if w.sink is not None and target > 0:
        snap = await w.sink.load_snapshot(w.snap_key)
        if snap is not None and topic_id is not None and snap.topic_id != topic_id:
            # Written before commits carried ids ("") or for a deleted topic of the
            # same name: its offsets are another log's. A full replay is always right.
            log.warning(
                "%s: ignoring the Redis snapshot at offset %d: it is of topic id %s, "
                "expected %s (another incarnation of the topic); full replay",
                w.tp,
                snap.offset,
                snap.topic_id or "(none)",
                topic_id,
            )
            snap = None
        # A snapshot beyond the committed offset belongs to output that never
        # committed; it cannot be rolled back, so it is ignored.
        if snap is not None and snap.offset <= target:
            try:
                w.norm = Normalizer.restore(snap.blob)
                start = snap.offset
            except (ValueError, KeyError, TypeError) as e:
                log.warning("%s: unusable snapshot (%s); full replay", w.tp, e)
                w.norm = Normalizer()
    replayed = 0
    if start < target:
        log.info("%s: replaying offsets %d to %d to restore", w.tp, start, target)
        replayed = await _replay(w, bootstrap, start, target, stopping)
    w.committed = target
    metrics.RESTORE.observe(time.monotonic() - t0)
    metrics.RESTORE_REPLAYED.inc(replayed)
    log.info(
        "%s restored at offset %d (snapshot %d, replayed %d) in %.3fs",
        w.tp,
        target,
        start,
        replayed,
        time.monotonic() - t0,
    )


async def _replay(
    w: PartitionWorker, bootstrap: str, start: int, end: int, stopping: asyncio.Event | None = None
) -> int:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        **kafka_auth(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    n = 0
    try:
        consumer.assign([w.tp])
        log_start = (await consumer.beginning_offsets([w.tp]))[w.tp]
        if log_start > start:
            # Deleted (retention, or by hand) since the state at ``start`` was made:
            # nothing can bring them back, so the book is rebuilt without them.
            gone = min(log_start, end) - start
            metrics.RAW_DELETED.labels("before_restore").inc(gone)
            log.warning(
                "%s: the book is rebuilt at offset %d without offsets %d to %d, deleted "
                "from the log (retention, or by hand): %d records; ticks of orders they "
                "placed or changed may be wrong",
                w.tp, end, start, start + gone - 1, gone,
            )  # fmt: skip
            if log_start >= end:
                return 0
            start = log_start
        consumer.seek(w.tp, start)
        sink: list[dict[str, Any]] = []
        while True:
            if stopping is not None and stopping.is_set():
                raise RestoreStopped(f"{w.tp}: stopped after replaying {n} records")
            # Short polls: a stop is seen within one of them.
            batch = await consumer.getmany(w.tp, timeout_ms=200, max_records=5_000)
            records = batch.get(w.tp, [])
            for rec in records:
                if rec.offset >= end:
                    return n
                w.apply(rec, 0, sink, silent=True)
                sink.clear()
                n += 1
                if rec.offset == end - 1:
                    return n
            if not records:
                # The handler checks the committed offset against the log end
                # first; this guards the loop against waiting forever all the same.
                log_end = (await consumer.end_offsets([w.tp]))[w.tp]
                if await consumer.position(w.tp) >= log_end:
                    if log_end >= end:  # the rest is transaction markers
                        return n
                    raise RestoreError(
                        f"{w.tp}: the log ends at offset {log_end}, before the "
                        f"offset {end} to restore at"
                    )
    finally:
        await stop_consumer(consumer)
