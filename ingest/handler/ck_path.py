"""A candidate exactly-once data path on confluent-kafka (librdkafka), in one thread.

consume -> the production per-record step (``PartitionWorker``: decode, normalise,
serialise, dead-letter) -> produce ticks -> ``send_offsets_to_transaction`` with
the consumer's group metadata (KIP-447: the coordinator refuses the offsets of a
member whose generation is stale, so a zombie cannot commit) -> commit.

Why a second path: the bench measured librdkafka's consume-and-produce 1.6-1.8x
aiokafka's on this machine, at about 3.5x less client CPU per record, and it
implements KIP-447 itself where aiokafka needs the protocol patched in. This
module is measured by ``bench/bench_handler.py`` ("handler_eos_ck") and is not
wired into ``FeedHandler``; it has no Redis snapshots, poison-record search or
metrics endpoint of its own (the caller may serve the shared registry).

Packed records: a record with codec ``itch-frames`` carries consecutive ITCH
messages of one partition, each behind the 2-byte length prefix of the ITCH
sample files (``itch.frame``), the way a MoldUDP64 packet carries many. Its
``seq`` header is the first message's feed sequence number.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, Message, Producer
from confluent_kafka import TopicPartition as CkPartition

from core.constants import (
    HDR_CODEC,
    HDR_DL_OFFSET,
    HDR_DL_PARTITION,
    HDR_DL_REASON,
    HDR_DL_TOPIC,
    HDR_SEQ,
)
from ingest.codecs import itch
from ingest.codecs.errors import SourceError
from ingest.handler.partition import Batch, DeadLetter, Outputs, PartitionWorker, unseen

log = logging.getLogger(__name__)

PACKED_CODEC = b"itch-frames"


@dataclass(frozen=True, slots=True)
class CkSettings:
    """Where the path reads and writes, and how it batches.

    :param transactional_id: unique per handler; a restarted handler with the
        same id fences its previous incarnation
    """

    bootstrap: str
    in_topic: str
    ticks_topic: str
    ticks_partitions: int
    deadletter_topic: str
    group: str
    transactional_id: str
    batch: int = 5000  # records per consume() and per transaction at most
    poll_timeout_s: float = 0.1


def to_record(m: Message) -> ConsumerRecord[bytes, bytes]:
    """A librdkafka message as the record type the per-record step takes."""
    value = m.value() or b""
    key = m.key()
    return ConsumerRecord(
        m.topic() or "", m.partition() or 0, m.offset() or 0, m.timestamp()[1],
        0, key, value, None, len(key or b""), len(value), m.headers() or [],
    )  # fmt: skip


def unpack(rec: ConsumerRecord[Any, Any]) -> Iterator[ConsumerRecord[Any, Any]]:
    """The feed messages of a packed record, each a record of its own at the
    packed record's offset; the n-th carries the ``seq`` of the first plus n.

    Raises SourceError when the frame is cut short (the caller dead-letters the
    whole record); a desynchronised span comes out as one record the decoder
    refuses, as the replay's framing does for a damaged file.
    """
    headers = [(k, v) for k, v in rec.headers if k not in (HDR_SEQ, HDR_CODEC)]
    first = dict(rec.headers).get(HDR_SEQ)
    seq = int(first) if first is not None and first.isdigit() else None
    frames = itch.iter_frames(io.BytesIO(rec.value or b""), name=f"offset {rec.offset}")
    for i, payload in enumerate(frames):
        h = headers if seq is None else [*headers, (HDR_SEQ, str(seq + i).encode())]
        yield ConsumerRecord(
            rec.topic, rec.partition, rec.offset, rec.timestamp, rec.timestamp_type,
            rec.key, payload, None, rec.serialized_key_size, len(payload), h,
        )  # fmt: skip


def transform(w: PartitionWorker, records: list[ConsumerRecord[Any, Any]]) -> Batch | None:
    """``PartitionWorker.transform``, packed records opened into their messages."""
    if not any(dict(r.headers).get(HDR_CODEC) == PACKED_CODEC for r in records):
        return w.transform(records)
    records = unseen(records, w.committed)
    if not records:
        return None
    b = Batch(w, records, [], [], [], time.time_ns())
    for rec in records:
        if dict(rec.headers).get(HDR_CODEC) != PACKED_CODEC:
            subs: Iterator[ConsumerRecord[Any, Any]] = iter((rec,))
        else:
            subs = unpack(rec)
        try:
            for sub in subs:
                dl = w.apply(sub, b.recv_ts, b.ticks, values=b.values)
                if dl is not None:
                    b.dead.append(dl)
        except SourceError as e:
            b.dead.append(DeadLetter(rec, "bad_frame", str(e)))
    return b


def produce(p: Producer, b: Batch) -> None:
    """Hand a batch's ticks and dead letters to the producer."""
    out = b.worker.outputs
    for t, value in zip(b.ticks, b.values, strict=True):
        part, key = out.route(t["symbol"])
        _produce(p, out.ticks_topic, value, key, part, None)
    for dl in b.dead:
        rec = dl.record
        headers: list[tuple[str, str | bytes | None]] = [
            (HDR_DL_REASON, f"{dl.reason}: {dl.detail}".encode(errors="replace")),
            (HDR_DL_TOPIC, rec.topic.encode()),
            (HDR_DL_PARTITION, str(rec.partition).encode()),
            (HDR_DL_OFFSET, str(rec.offset).encode()),
            *(rec.headers or ()),
        ]
        _produce(p, out.deadletter_topic, rec.value or b"", rec.key, -1, headers)


def _produce(p: Producer, topic: str, value: bytes, key: bytes | None, part: int,
             headers: list[tuple[str, str | bytes | None]] | None) -> None:  # fmt: skip
    while True:
        try:
            if headers is None:
                p.produce(topic, value, key, part)
            else:
                p.produce(topic, value, key, part, headers=headers)
            return
        except BufferError:  # the local queue is full: let librdkafka send
            p.poll(0.05)


class CkPath:
    """One handler's data path: a consumer and a transactional producer, one thread."""

    def __init__(self, s: CkSettings) -> None:
        self.s = s
        self.outputs = Outputs(s.ticks_topic, s.ticks_partitions, s.deadletter_topic)
        self.workers: dict[int, PartitionWorker] = {}
        self.consumer = Consumer({
            "bootstrap.servers": s.bootstrap, "group.id": s.group,
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
        })  # fmt: skip
        self.producer = Producer({
            "bootstrap.servers": s.bootstrap, "transactional.id": s.transactional_id,
            "linger.ms": 2, "queue.buffering.max.messages": 1_000_000,
            "transaction.timeout.ms": 60_000,
        })  # fmt: skip
        self.records = 0  # input records committed

    def run(self, stop: threading.Event) -> None:
        """Consume, transform and commit until ``stop`` is set, then close."""
        self.producer.init_transactions(30)
        self.consumer.subscribe(
            [self.s.in_topic], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        try:
            while not stop.is_set():
                msgs = self.consumer.consume(self.s.batch, self.s.poll_timeout_s)
                if msgs:
                    self._cycle(msgs)
        finally:
            self.consumer.close()
            self.producer.flush(10)

    def _cycle(self, msgs: list[Message]) -> None:
        by_part: dict[int, list[ConsumerRecord[Any, Any]]] = {}
        for m in msgs:
            if m.error() is not None:
                log.warning("consume: %s", m.error())
                continue
            by_part.setdefault(m.partition() or 0, []).append(to_record(m))
        work = []
        for part, recs in by_part.items():
            w = self.workers.get(part)
            b = transform(w, recs) if w is not None else None
            if b is not None:
                work.append(b)
        if work:
            self._commit(work)

    def _commit(self, work: list[Batch]) -> None:
        """One transaction: every batch's output and its offsets, or none of it."""
        p = self.producer
        try:
            p.begin_transaction()
            for b in work:
                produce(p, b)
            offsets = [CkPartition(self.s.in_topic, b.worker.tp.partition, b.next_offset)
                       for b in work]  # fmt: skip
            p.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), 30)
            p.commit_transaction(30)
        except KafkaException as e:
            log.warning("transaction failed, rewinding to the committed offsets: %s", e)
            self._abort(work, e)
            return
        done = time.time()
        for b in work:
            b.worker.committed_batch(b, done)
            self.records += len(b.records)

    def _abort(self, work: list[Batch], e: KafkaException) -> None:
        """Drop the batches' effect on state: abort, rebuild, seek back."""
        if e.args and e.args[0].txn_requires_abort():
            self.producer.abort_transaction(30)
        elif not (e.args and e.args[0].retriable()):
            raise e  # fenced or fatal: this incarnation must stop
        for b in work:
            tp = b.worker.tp
            self.workers[tp.partition] = self._worker(tp.partition, b.worker.committed)
            self.consumer.seek(CkPartition(tp.topic, tp.partition, b.worker.committed))

    def _worker(self, part: int, committed: int | None) -> PartitionWorker:
        """A partition's worker, its state rebuilt at ``committed`` (the production
        restore: a silent replay of the raw records before it)."""
        tp = TopicPartition(self.s.in_topic, part)
        w = PartitionWorker(tp, self.s.group, self.outputs, None, 3600.0)
        asyncio.run(w.restore(self.s.bootstrap, committed))
        return w

    def _on_assign(self, consumer: Consumer, parts: list[CkPartition]) -> None:
        for c in consumer.committed(parts, timeout=30):
            off = c.offset if c.offset != OFFSET_INVALID else None
            self.workers[c.partition] = self._worker(c.partition, off)

    def _on_revoke(self, consumer: Consumer, parts: list[CkPartition]) -> None:
        # Every batch commits before the next consume(), where this runs: nothing
        # of these partitions is pending.
        for c in parts:
            self.workers.pop(c.partition, None)
