"""One input partition's state: its normaliser, its restore, its share of a batch.

Exactly-once rests on three things (the handler commits, see service.py):

1. One transaction per poll holds every partition's ticks, dead letters and
   consumer offsets, so a ``read_committed`` reader sees each batch entirely or
   not at all, and the committed offsets always match the committed output.
2. The consumer group fences a stale owner (fencing.py): the transaction's
   offset commit carries the group generation, which the coordinator refuses
   once the partitions have moved, and a new owner reads its start offset only
   once no open transaction holds one for the partition.
3. Normaliser state is restored to exactly the committed offset before any new
   output: the newest Redis snapshot at or below it, then a silent replay of
   the raw records up to it. Processing is deterministic, so ticks after a
   move are byte-for-byte those of an uninterrupted run (receive time aside).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition

from core.constants import (
    HDR_CODEC,
    HDR_DATE,
    HDR_DL_OFFSET,
    HDR_DL_PARTITION,
    HDR_DL_REASON,
    HDR_DL_TOPIC,
    HDR_SEQ,
)
from ingest import metrics
from ingest.codecs.errors import DecodeError
from ingest.handler.redis_sink import RedisSink, snapshot_key
from ingest.keys import partition_for, symbol_key
from ingest.normalize import Normalizer

log = logging.getLogger(__name__)


class RestoreStopped(Exception):
    """The handler stopped while a partition's state was being replayed."""


class RestoreError(Exception):
    """A partition's state cannot be rebuilt at the offset asked for."""


class Outputs:
    """Where a partition's results go, shared by all partitions of a handler."""

    def __init__(self, ticks_topic: str, ticks_partitions: int, deadletter_topic: str) -> None:
        self.ticks_topic = ticks_topic
        self.ticks_partitions = ticks_partitions
        self.deadletter_topic = deadletter_topic
        self._routes: dict[str, tuple[int, bytes]] = {}

    def route(self, symbol: str) -> tuple[int, bytes]:
        """A tick's partition and key. The key is the one the replay gives the
        symbol's raw messages, which keeps the two topics co-partitioned."""
        r = self._routes.get(symbol)
        if r is None:
            key = symbol_key(symbol)
            r = self._routes[symbol] = (partition_for(key, self.ticks_partitions), key)
        return r


def unseen(records: list[ConsumerRecord[Any, Any]], start: int) -> list[ConsumerRecord[Any, Any]]:
    """The records at or past offset ``start``, each offset once, in order.

    A seek back to the committed offset (every assignment makes one) lets the
    consumer return records it has already returned; they can sit in one batch
    behind their first copy.
    """
    out = []
    nxt = start
    for r in records:
        if r.offset >= nxt:
            out.append(r)
            nxt = r.offset + 1
    return out


def _read_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def read_later(fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """``fut``, its outcome read whenever it comes.

    The commit reads every send's outcome, unless it was given up (a topic gone, the
    commit past its time limit): the producer is then discarded, and its unsent batches
    fail later, when a newer producer fences it, with nobody awaiting them; asyncio
    would log each with a traceback as never retrieved."""
    fut.add_done_callback(_read_outcome)
    return fut


def _headers(rec: ConsumerRecord[Any, Any]) -> dict[str, bytes]:
    return dict(rec.headers) if rec.headers else {}


_CODECS = frozenset((b"itch", b"json"))
# Feed sequence numbers are kept in the state, which snapshots as JSON: an
# integer outside 64 bits would make every later snapshot fail.
_MAX_SEQ = 2**63 - 1


def _feed_seq(raw: bytes | None) -> int | None:
    """A record's feed sequence header as a number; None for anything else."""
    try:
        seq = int(raw)  # type: ignore[arg-type]  # a header's value may be null
    except (TypeError, ValueError):
        return None
    return seq if 0 < seq <= _MAX_SEQ else None


@dataclass(slots=True)
class DeadLetter:
    """A record the handler gives up on: ``reason`` is a short stable code (the
    metric's label, the head of the dead letter's reason header), ``detail`` is
    for humans."""

    record: ConsumerRecord[Any, Any]
    reason: str
    detail: str
    # Without the record's bytes and headers: the last resort when even its dead
    # letter cannot be committed (too large for the dead-letter topic).
    bare: bool = False

    @classmethod
    def of(cls, rec: ConsumerRecord[Any, Any], e: Exception) -> DeadLetter:
        if isinstance(e, DecodeError):
            return cls(rec, e.reason, e.detail)
        if isinstance(e, orjson.JSONEncodeError):
            return cls(rec, "unserialisable", str(e))
        return cls(rec, "unexpected_error", f"{type(e).__name__}: {e}")


@dataclass(slots=True)
class Batch:
    """One partition's share of a poll, transformed and not yet committed.

    ``values`` holds each tick of ``ticks`` serialised, in the same order.
    """

    worker: PartitionWorker
    records: list[ConsumerRecord[Any, Any]]
    ticks: list[dict[str, Any]]
    values: list[bytes]
    dead: list[DeadLetter]
    recv_ts: int

    @property
    def next_offset(self) -> int:
        return int(self.records[-1].offset) + 1


class PartitionWorker:
    """Owns one input partition's state; the handler commits its output.

    :param tp: the input partition
    :param group: consumer group (names the partition's Redis snapshot)
    """

    def __init__(
        self,
        tp: TopicPartition,
        group: str,
        outputs: Outputs,
        sink: RedisSink | None,
        snapshot_interval_s: float,
    ) -> None:
        self.tp = tp
        self.group = group
        self.outputs = outputs
        self.sink = sink
        self.norm = Normalizer()
        self.committed = 0  # next offset to process, as committed
        self.snapshot_interval_s = snapshot_interval_s
        self._last_snapshot = 0.0
        self._partition_label = str(tp.partition)
        self.snap_key = snapshot_key(group, tp.topic, tp.partition)
        # Set by the handler while it looks for the record that keeps a batch from
        # committing: batches of one record, and records to dead-letter unsent
        # (offset -> what kept failing).
        self.one_at_a_time = False
        self.condemned: dict[int, str] = {}
        self.bare: set[int] = set()

    async def restore(
        self,
        bootstrap: str,
        committed: int | None,
        topic_id: str | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        """Rebuild state at the committed offset (see :func:`rebuild.restore`)."""
        from ingest.handler.rebuild import restore

        await restore(self, bootstrap, committed, topic_id, stopping)

    # Processing -----------------------------------------------------------------------

    def apply(
        self,
        rec: ConsumerRecord[Any, Any],
        recv_ts: int,
        out: list[dict[str, Any]],
        silent: bool = False,
        values: list[bytes] | None = None,
    ) -> DeadLetter | None:
        """Apply one record to the state, appending its ticks to ``out`` (and their
        serialised form to ``values``); the DeadLetter when the record cannot be used.

        Live processing and a restore's silent replay run exactly this, so a record
        fails the same way in both and leaves the same state behind.
        """
        h = _headers(rec)
        codec = h.get(HDR_CODEC, b"itch")
        # A new trading day numbers its feed from 1 again: the day is taken before the
        # sequence is checked, and a record of an earlier day (dead-lettered below) is
        # not counted against today's numbers.
        today = True
        norm = self.norm
        if codec == b"itch" and h.get(HDR_DATE, norm.day_header) != norm.day_header:
            was = norm.day
            today = norm.enter_day(h[HDR_DATE])
            if was is not None and norm.day != was and not silent:
                log.info(
                    "%s: trading day %s begins at offset %d", self.tp, self.norm.day, rec.offset
                )
        if today and HDR_SEQ in h:
            seq = _feed_seq(h[HDR_SEQ])
            missed = 0 if seq is None else self.norm.check_feed_seq(seq)
            if missed and not silent:
                metrics.SEQUENCE_GAPS.inc(missed)
                log.warning("%s: feed sequence gap of %d before %d", self.tp, missed, seq)
        mark = len(out)
        try:
            value = rec.value or b""
            if codec == b"itch":
                day = h.get(HDR_DATE)
                if day is None:
                    raise DecodeError("missing_date", "ITCH record without a date header")
                self.norm.on_itch(value, day, recv_ts, out)
            elif codec == b"json":
                self.norm.on_json(value, recv_ts, out)
            else:
                raise DecodeError("unknown_codec", f"{codec!r:.40}")
            # Serialised here rather than at send time, so a value the wire format
            # cannot carry fails this record instead of the whole batch's commit.
            n = len(out) - mark
            if n == 1:
                encoded: tuple[bytes, ...] | list[bytes] = (orjson.dumps(out[mark]),)
            elif n:
                encoded = [orjson.dumps(t) for t in out[mark:]]
            else:
                encoded = ()
        except Exception as e:  # whatever the record did, it alone is dead-lettered
            self._discard(out, mark)
            dl = DeadLetter.of(rec, e)
            if not silent:
                label = codec.decode() if codec in _CODECS else "other"
                metrics.DECODE_ERRORS.labels(label, dl.reason).inc()
                if not isinstance(e, DecodeError):
                    log.warning("%s: record at offset %d failed: %r", self.tp, rec.offset, e)
            return dl
        if values is not None and encoded:
            values.extend(encoded)
        return None

    def _discard(self, out: list[dict[str, Any]], mark: int) -> None:
        """Drop the ticks a failed record made, and give back their sequence numbers
        so each symbol's ticks stay gap-free. Decoding and validation come before any
        other change to the state, so a record failing there leaves none; one failing
        later (a tick that cannot be serialised) may have moved a book, the same way
        in a restore's replay."""
        seqs = self.norm.seqs
        for t in reversed(out[mark:]):
            sym = t.get("symbol")
            n = t.get("seq")
            if isinstance(n, int) and seqs.get(sym) == n:
                if n > 1:
                    seqs[sym] = n - 1
                else:
                    del seqs[sym]
        del out[mark:]

    def transform(self, records: list[ConsumerRecord[Any, Any]]) -> Batch | None:
        """Apply a poll's records to the state; None when none of them is new.

        Every record is either applied or dead-lettered; nothing it holds raises.
        The state then runs ahead of the committed offset: the caller commits the
        batch (``committed_batch``) or discards this worker and restores it.
        """
        # A rewound fetch, or a batch holding the same records twice, must never
        # feed the same input to the state twice.
        records = unseen(records, self.committed)
        if not records:
            return None
        if self.one_at_a_time:
            records = records[:1]
        b = Batch(self, records, [], [], [], time.time_ns())
        errs_before = sum(self.norm.book_errors.values())
        condemned = self.condemned
        for rec in records:
            if condemned and rec.offset in condemned:
                why = condemned[rec.offset]
                # Applied like any record, as a restore's replay will apply it, but
                # its output is withheld: it is what kept the commit failing.
                self.apply(rec, b.recv_ts, [], silent=True)
                b.dead.append(
                    DeadLetter(rec, "repeated_failure", why, bare=rec.offset in self.bare)
                )
                continue
            dl = self.apply(rec, b.recv_ts, b.ticks, values=b.values)
            if dl is not None:
                b.dead.append(dl)
        if sum(self.norm.book_errors.values()) != errs_before:
            self._count_book_errors()
        return b

    async def send(self, producer: AIOKafkaProducer, b: Batch) -> list[asyncio.Future[Any]]:
        """Hand the batch's ticks and dead letters to the producer."""
        futures = await self._send_ticks(producer, b.ticks, b.values)
        for dl in b.dead:
            rec = dl.record
            detail = dl.detail
            if dl.bare:
                detail += f" (dead letter without the record's {len(rec.value or b'')} bytes)"
            futures.append(
                read_later(
                    await producer.send(
                        self.outputs.deadletter_topic,
                        b"" if dl.bare else rec.value or b"",
                        key=None if dl.bare else rec.key,
                        headers=[
                            (HDR_DL_REASON, f"{dl.reason}: {detail}".encode(errors="replace")),
                            (HDR_DL_TOPIC, rec.topic.encode()),
                            (HDR_DL_PARTITION, str(rec.partition).encode()),
                            (HDR_DL_OFFSET, str(rec.offset).encode()),
                            *(() if dl.bare else rec.headers or ()),
                        ],
                    )
                )
            )
        return futures

    def committed_batch(self, b: Batch, done: float) -> None:
        """The batch's output and offset are committed (at ``done``, epoch seconds)."""
        self.committed = b.next_offset
        records = b.records
        for i in range(0, len(records), 8):
            metrics.E2E_LATENCY.observe(max(0.0, done - records[i].timestamp / 1000))
        metrics.MESSAGES_IN.labels(self._partition_label).inc(len(records))
        metrics.BATCH_SIZE.observe(len(records))
        for dl in b.dead:
            metrics.DEADLETTERS.labels(dl.reason).inc()
        n_trades = sum(1 for t in b.ticks if t["kind"] == "trade")
        if n_trades:
            metrics.TICKS_OUT.labels("trade").inc(n_trades)
        if len(b.ticks) - n_trades:
            metrics.TICKS_OUT.labels("quote").inc(len(b.ticks) - n_trades)
        if self.sink is not None:
            self.sink.last_ticks(b.ticks)
            if done - self._last_snapshot >= self.snapshot_interval_s:
                self.save_snapshot()

    async def _send_ticks(
        self, p: AIOKafkaProducer, ticks: list[dict[str, Any]], values: list[bytes]
    ) -> list[asyncio.Future[Any]]:
        """Send ticks in per-partition batches: far cheaper than a send() per tick."""
        out = self.outputs
        by_part: dict[int, Any] = {}
        futures: list[asyncio.Future[Any]] = []
        for t, value in zip(ticks, values, strict=True):
            part, key = out.route(t["symbol"])
            b = by_part.get(part)
            if b is None:
                b = by_part[part] = p.create_batch()
            if b.append(key=key, value=value, timestamp=None) is None:
                futures.append(read_later(await p.send_batch(b, out.ticks_topic, partition=part)))
                b = by_part[part] = p.create_batch()
                b.append(key=key, value=value, timestamp=None)
        for part, b in by_part.items():
            futures.append(read_later(await p.send_batch(b, out.ticks_topic, partition=part)))
        return futures

    def _count_book_errors(self) -> None:
        for reason, n in self.norm.book_errors.items():
            metrics.BOOK_ERRORS.labels(reason).inc(n)
            log.debug("%s: book inconsistency %s x%d", self.tp, reason, n)
        self.norm.book_errors.clear()

    def save_snapshot(self) -> None:
        """Queue a snapshot of state at the committed offset (call only after a commit)."""
        if self.sink is None:
            return
        self.sink.snapshot(self.snap_key, self.committed, self.norm.snapshot())
        self._last_snapshot = time.time()
