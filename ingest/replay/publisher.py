"""Publishes a replay source to ``md.raw`` at a chosen speed.

Pacing follows the source's own timestamps: message i is due at
``start + (ts_i - ts_0) / speed``. The publisher sleeps only when it is ahead
of schedule; when the broker or the source cannot keep up it runs behind, and
the drift (how late messages went out) is measured and reported instead of
being hidden. Partitioning is computed here (Kafka's murmur2 over the
instrument key) so each partition's records carry their own gap-free feed
sequence number, and market-wide messages are copied to every partition.

A replay never leaves a day it cannot account for. The manifest is handed to
a checkpoint callback every few seconds, each time after the broker has
acknowledged every record it counts. The producer is idempotent and retries a
batch with its sequence numbers unchanged, so the broker keeps one copy of it
however often it arrives: a broker that goes away is waited for, up to an
outage deadline, without loss or duplicates. A resumed replay skips what its
manifest counts and reads the broker back for what arrived after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder

from core.constants import HDR_BROADCAST, HDR_CODEC, HDR_DATE, HDR_SEQ
from core.secrets import kafka_auth
from ingest.codecs.errors import SourceError
from ingest.kafka_metadata import throttle_metadata_updates
from ingest.keys import partition_for
from ingest.manifest import Manifest, ManifestBuilder
from ingest.replay.outage import BrokerOutage, OutageGuard, TopicLost, reach_topic
from ingest.replay.resume import check_incarnation, landed_after, log_ends, topic_incarnation
from ingest.replay.source import NS, RawMessage

log = logging.getLogger(__name__)

T = TypeVar("T")

_CODEC_HDR = {"itch": b"itch", "json": b"json"}
# Records reach the producer in batches at each yield, and its sender task runs
# only while this loop yields. A publisher running behind schedule never sleeps,
# so without a bound it would hold a burst of records back from the broker for
# as long as it stays behind.
_YIELD_EVERY_S = 0.002
# How long an open batch lingers before it is sent (once its partition's previous
# batch is acknowledged): the producer's own linger before. Fuller batches cost
# the broker less per record.
_FLUSH_EVERY_S = 0.005
# Acknowledgements (one per batch) are checked in chunks: bounds memory and
# surfaces broker errors promptly. Only the older half is checked, which the
# broker acknowledged long ago, so the feed does not stop to wait for its newest
# records; and one by one, since gathering thousands of futures stalls the loop.
_PENDING_MAX = 2_000


class _Batches:
    """One open record batch per partition, handed to the producer whole.

    A ``send()`` per record costs the producer's per-message bookkeeping and a
    future each; appending to a batch is a fraction of that, and a feed that
    spends less CPU per record leaves more for the broker and the handlers
    sharing its machine. A partition's batch goes out when full, or at a
    ``flush()`` (the publisher's linger) once the partition's previous batch is
    acknowledged: the producer sends one batch per partition per request, and
    queueing a second would make ``send_batch`` wait for the first to leave.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        partitions: int,
        guard: Callable[[Awaitable[Any]], Awaitable[Any]],
        on_ack: Callable[[asyncio.Future[Any]], None],
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._open: list[BatchBuilder | None] = [None] * partitions
        self._last: list[asyncio.Future[Any] | None] = [None] * partitions
        self._guard = guard
        self._on_ack = on_ack
        self.pending: list[asyncio.Future[Any]] = []

    def add(
        self, partition: int, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> bool:
        """Append to the partition's open batch; False if it is full (then ``add_full``)."""
        b = self._open[partition]
        if b is not None:
            return b.append(key=key, value=value, timestamp=None, headers=headers) is not None
        b = self._open[partition] = self._producer.create_batch()
        if b.append(key=key, value=value, timestamp=None, headers=headers) is None:
            raise ValueError(f"a {len(value)}-byte record does not fit in an empty batch")
        return True

    async def add_full(
        self, partition: int, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        """Send the partition's full batch (waiting for the previous one if need be)
        and start the next with this record."""
        b = self._open[partition]
        assert b is not None
        await self._send(partition, b)
        self.add(partition, key, value, headers)

    async def flush(self, wait: bool = False) -> None:
        """Send the open batches whose partition has nothing in flight (all: ``wait``)."""
        for partition, b in enumerate(self._open):
            last = self._last[partition]
            if b is not None and (wait or last is None or last.done()):
                await self._send(partition, b)

    async def _send(self, partition: int, b: BatchBuilder) -> None:
        b.close()
        self._open[partition] = None
        # Waits while the partition's previous batch is queued: through an outage too.
        fut = await self._guard(self._producer.send_batch(b, self._topic, partition=partition))
        fut.add_done_callback(self._on_ack)
        self._last[partition] = fut
        self.pending.append(fut)


@dataclass
class ReplayStats:
    source_messages: int = 0
    records: int = 0
    started: float = 0.0
    elapsed: float = 0.0
    source_clock_ns: int = 0
    drift_samples: list[float] = field(default_factory=list)
    # Of source_messages and records: counted by an earlier run, not sent by this one.
    resumed_messages: int = 0
    resumed_records: int = 0

    def pacing(self, speed: float | None) -> dict[str, float]:
        """The manifest's pacing record: the speed asked for, the time taken, the drift."""
        drift = {"drift_" + k: v for k, v in self.drift_summary().items()}
        return {"speed": speed or 0.0, "elapsed_s": round(self.elapsed, 3), **drift}

    def drift_summary(self) -> dict[str, float]:
        d = sorted(self.drift_samples)
        if not d:
            return {"p50_s": 0.0, "p99_s": 0.0, "max_s": 0.0}
        return {
            "p50_s": round(d[len(d) // 2], 4),
            "p99_s": round(d[min(len(d) - 1, int(len(d) * 0.99))], 4),
            "max_s": round(d[-1], 4),
        }


# What the topic check says of a topic the broker does not know; and how long after a first
# such answer (or another topic id) it is asked again before the replay ends on it.
_GONE = "<gone>"
_RECHECK_S = 2.0


def _producer(bootstrap: str, outage_deadline_s: float, batch_bytes: int) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        **kafka_auth(),
        acks="all",
        # Retries keep a batch's sequence numbers, so the broker stores it once
        # however often it is sent; idempotent batches are retried without end
        # (the outage deadline is this publisher's), and their time in the
        # queue must outlast the deadline too, or it would fail them first.
        enable_idempotence=True,
        request_timeout_ms=int((outage_deadline_s + 60) * 1000),
        retry_backoff_ms=500,
        linger_ms=5,
        max_batch_size=batch_bytes,
        max_request_size=4 * 1024 * 1024,
    )


async def _landed(
    bootstrap: str, topic: str, partitions: int, prev: Manifest | None, now_id: str | None
) -> list[int]:
    """Per partition, the records of the resumed run (``prev``) that reached the broker
    after its manifest was written; SourceError if the topic is no longer the one that
    run sent to (``now_id``: its id now)."""
    if prev is None:
        return [0] * partitions
    check_incarnation(prev, topic, now_id)
    if prev.partitions != partitions:
        raise SourceError(
            f"--topic {topic}",
            f"has {partitions} partitions, the resumed replay sent to {prev.partitions}",
        )
    return await landed_after(bootstrap, topic, partitions, prev)


@dataclass(frozen=True)
class ReplayerOptions:
    """How a replay checkpoints, resumes and waits out a broker.

    :param checkpoint: called with the manifest of what the broker acknowledged,
        every ``checkpoint_every_s`` and when the replay ends, however it ends
        (``complete`` is true only when the whole source was sent)
    :param resume: the manifest of an earlier run of the same replay: the messages
        it counts are not sent again, nor those of its records that reached the
        broker after it was written
    :param outage_deadline_s: how long the broker may acknowledge nothing before
        the replay gives up (BrokerOutage)
    :param connect_timeout_s: how long to wait for a broker before the first record
    :param check_topic: called with the topic's id (None where the broker gives none)
        once the topic is found, before the first record; raises to refuse the replay
    """

    checkpoint: Callable[[Manifest], None] | None = None
    checkpoint_every_s: float = 5.0
    resume: Manifest | None = None
    outage_deadline_s: float = 300.0
    connect_timeout_s: float = 10.0
    check_topic: Callable[[str | None], None] | None = None


class Replayer:
    """Sends a source to Kafka and builds the manifest of what it sent.

    :param bootstrap: Kafka bootstrap servers
    :param topic: raw topic (``md.raw``)
    :param source: messages in feed order
    :param speed: 1.0 = real time, 60 = a minute per second, None = as fast as possible
    :param day: trading date (ISO) stamped on ITCH records so handlers can build
        absolute event times from ITCH's time-since-midnight
    :param manifest: off only where nothing will be verified (benchmarks)
    :param options: checkpoints, resume and patience (see :class:`ReplayerOptions`)
    """

    batch_bytes = 512 * 1024  # per partition and request

    def __init__(
        self, bootstrap: str, topic: str, source: Iterable[RawMessage], speed: float | None,
        day: str, on_progress: Any = None, manifest: bool = True,
        options: ReplayerOptions | None = None,
    ) -> None:  # fmt: skip
        o = options or ReplayerOptions()
        resume = o.resume
        if speed is not None and not speed > 0:
            raise ValueError("speed must be > 0 or 'max'")
        self.bootstrap, self.topic, self.source, self.speed, self.day = (
            bootstrap, topic, source, speed, day
        )  # fmt: skip
        self.stats = ReplayStats()
        self.builder = ManifestBuilder()
        self.partitions = 0
        self.topic_id: str | None = None
        self._on_progress = on_progress
        self._manifest = manifest
        self._checkpoint_cb = o.checkpoint if manifest else None
        self._checkpoint_every_s = o.checkpoint_every_s
        self._resume = resume
        self._check_topic_id = o.check_topic
        self.outage_deadline_s = o.outage_deadline_s
        self.connect_timeout_s = o.connect_timeout_s
        self._stop = asyncio.Event()
        self.outage = OutageGuard(bootstrap, o.outage_deadline_s, self._stop)
        self.outage.check = self._check_topic
        self._seqs: list[int] = []
        self._start_offsets: list[int] = []  # where the replay's records begin, per partition
        # Per partition: records numbered up to this are on the broker already.
        self._on_broker: list[int] = []
        self._skip_messages = resume.source_messages if resume is not None else 0
        self.complete = False
        self._day_hdr = day.encode()
        self._last_progress = self._last_yield = self._last_flush = self._last_checkpoint = 0.0

    @property
    def interrupted(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop after the message in flight; what was sent is still in the manifest."""
        self._stop.set()

    async def run(self) -> Manifest:
        """Send the source; the manifest of what was sent.

        :raises SourceError: the broker cannot be reached or the topic does not
            exist (before anything is sent), or the source fails part-way (after
            the checkpoint of what was sent before)
        :raises BrokerOutage: the broker acknowledged nothing for the outage
            deadline; the last checkpoint counts only what it acknowledged
        """
        landed = await self._prepare()
        producer = _producer(self.bootstrap, self.outage_deadline_s, self.batch_bytes)
        throttle_metadata_updates(producer, 0.5)
        await producer.start()
        out = _Batches(
            producer, self.topic, self.partitions, self.outage.guard, self.outage.acked_one
        )
        aborted = False
        try:
            try:
                await self._send_all(out, landed)
            except SourceError:
                # What was sent before the fault is verifiable and resumable (the
                # resumed manifest stands if the fault came before its end).
                if self.stats.source_messages >= self._skip_messages:
                    await self._checkpoint(out, complete=False)
                raise
            if self.stats.source_messages < self._skip_messages:
                raise SourceError(
                    "--resume",
                    f"the source ends after {self.stats.source_messages:,} messages, the "
                    f"manifest counts {self._skip_messages:,}: it was written from another",
                )
            self.complete = not self._stop.is_set()
            return await self._checkpoint(out, complete=self.complete)
        except BaseException:
            aborted = True
            raise
        finally:
            if aborted:
                # Its queue may never drain (a broker gone for good): it is not waited for.
                with contextlib.suppress(Exception, asyncio.TimeoutError):
                    await asyncio.wait_for(producer.stop(), 5)
            else:
                await producer.stop()

    async def _prepare(self) -> list[int]:
        """Learn the topic's partitions; per partition, the records of the resumed run that
        reached the broker after its manifest was written."""
        self.partitions = len(await reach_topic(self.bootstrap, self.topic, self.connect_timeout_s))
        self.topic_id = await topic_incarnation(self.bootstrap, self.topic)
        if self._check_topic_id is not None:
            self._check_topic_id(self.topic_id)
        if self._resume is not None:
            self._start_offsets = list(self._resume.start_offsets)
        elif self._checkpoint_cb is not None:
            self._start_offsets = await log_ends(self.bootstrap, self.topic, self.partitions)
        self._seqs = [0] * self.partitions
        self._on_broker = [0] * self.partitions
        return await _landed(
            self.bootstrap, self.topic, self.partitions, self._resume, self.topic_id
        )

    async def _check_topic(self) -> None:
        """TopicLost unless the topic is still the incarnation the replay began sending to."""
        from aiokafka.errors import UnknownTopicOrPartitionError

        async def incarnation() -> str | None:
            try:
                return await topic_incarnation(self.bootstrap, self.topic)
            except UnknownTopicOrPartitionError:
                return _GONE

        where = f"--topic {self.topic}"
        now = await incarnation()
        if now == _GONE or (self.topic_id and now and now != self.topic_id):
            # Ending a replay on a broker's passing word (one just restarted, its metadata
            # not yet caught up) would cost a day: the answer must hold a moment later.
            await asyncio.sleep(_RECHECK_S)
            now = await incarnation()
        if now == _GONE:
            raise TopicLost(
                where,
                "was deleted during the replay, and what it had sent with it: create the "
                "topic again (tickscale topics) and replay the day without --resume, after "
                "removing the manifest",
            )
        if self.topic_id and now and now != self.topic_id:
            raise TopicLost(
                where,
                f"was deleted and created again during the replay (topic id {self.topic_id} "
                f"then, {now} now), so the day is split across two logs: replay it again "
                "without --resume, after removing the manifest",
            )

    async def _checkpoint(self, out: _Batches, complete: bool) -> Manifest:
        """Send what is open, wait for the broker to acknowledge everything sent, and
        hand over the manifest of it."""
        await out.flush(wait=True)
        pending = out.pending[:]
        out.pending.clear()
        await self.outage.acked(pending)
        if complete:
            # A topic deleted and made again quickly never silences the broker: the rest of
            # the day went to the new one. Checked before the manifest calls the day sent.
            await self._check_topic()
        st = self.stats
        st.elapsed = time.monotonic() - st.started if st.started else 0.0
        acked_at_ms = int(time.time() * 1000)  # every record counted was sent before now
        prev = self._resume
        behind = any(s < b for s, b in zip(self._seqs, self._on_broker, strict=True))
        if prev is not None and behind:
            # Records of the resumed run are on the broker past this count: the
            # next resume must look for them from where this one did.
            acked_at_ms = prev.acked_at_ms
        m = self.builder.build(
            source="",
            topic=self.topic,
            partitions=self.partitions,
            records_sent=st.records,
            complete=complete,
            partition_seqs=list(self._seqs),
            acked_at_ms=acked_at_ms,
            pacing=st.pacing(self.speed),
            topic_id=self.topic_id or "",
            start_offsets=self._start_offsets,
        )
        if self._checkpoint_cb is not None:
            self._checkpoint_cb(m)
        return m

    async def _send_all(self, out: _Batches, landed: list[int]) -> None:
        n_parts = self.partitions
        st = self.stats
        prev = self._resume
        for p in range(n_parts):
            counted = prev.partition_seqs[p] if prev is not None and prev.partition_seqs else 0
            self._on_broker[p] = counted + landed[p]
        first_ts: int | None = None
        st.started = time.monotonic()
        self.outage.last_ack = st.started
        self._last_progress = 0.0
        self._last_yield = self._last_flush = self._last_checkpoint = st.started
        if prev is None and self._checkpoint_cb is not None:
            # On disk before the first record goes out: a replay killed before its first
            # checkpoint leaves a manifest that refuses a fresh run (which would send its
            # records twice) and that --resume carries on from.
            await self._checkpoint(out, complete=False)
        speed = self.speed
        for m in self.source:
            targets = range(n_parts) if m.key is None else (partition_for(m.key, n_parts),)
            # Not stopped while skipping: a manifest counting less than the resumed
            # one would have what it counted sent again.
            if st.source_messages < self._skip_messages:
                self._skip(m, targets)
                continue
            if self._stop.is_set():
                break
            if first_ts is None:
                first_ts = m.ts_ns
            if speed is not None:
                await self._pace(out, st.started + (m.ts_ns - first_ts) / NS / speed)
            await self._publish(out, m, targets)
            await self._housekeep(out)
        if self._on_progress is not None:
            self._on_progress(st)

    def _skip(self, m: RawMessage, targets: Iterable[int]) -> None:
        """A message the run being resumed sent: only its numbering and its share of
        the manifest are rebuilt."""
        st = self.stats
        n = 0
        for p in targets:
            self._seqs[p] += 1
            n += 1
        if self._manifest:
            self.builder.observe(m.payload, m.codec, self.day, n)
        st.source_messages += 1
        st.resumed_messages += 1
        st.records += n
        st.resumed_records += n

    async def _pace(self, out: _Batches, due: float) -> None:
        """Wait for the message's time, or note how late it goes out."""
        ahead = due - time.monotonic()
        if ahead > 0.002:
            if due - self._last_flush >= _FLUSH_EVERY_S:
                # Everything, rather than hold a batch through the sleep.
                await out.flush(wait=True)
                self._last_flush = time.monotonic()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            self._last_yield = due
        elif self.stats.source_messages & 63 == 0:
            # Sample lateness sparsely: one in 64 is plenty for percentiles.
            self.stats.drift_samples.append(max(0.0, -ahead))

    async def _publish(self, out: _Batches, m: RawMessage, targets: Iterable[int]) -> None:
        """Number the message in each of its partitions and add it to their batches."""
        st = self.stats
        seqs = self._seqs
        codec_hdr = _CODEC_HDR[m.codec]
        n = 0
        for p in targets:
            n += 1
            seqs[p] += 1
            st.records += 1
            if seqs[p] <= self._on_broker[p]:
                continue
            headers = [(HDR_CODEC, codec_hdr), (HDR_SEQ, str(seqs[p]).encode())]
            if m.codec == "itch":
                headers.append((HDR_DATE, self._day_hdr))
            if m.key is None:
                headers.append((HDR_BROADCAST, b"1"))
            if not out.add(p, m.key, m.payload, headers):
                await out.add_full(p, m.key, m.payload, headers)
        if self._manifest:
            self.builder.observe(m.payload, m.codec, self.day, n)
        st.source_messages += 1
        st.source_clock_ns = m.ts_ns

    async def _housekeep(self, out: _Batches) -> None:
        """After each message: old acknowledgements checked, the sender and signal
        handlers let run, checkpoints and progress on time."""
        pending = out.pending
        if len(pending) >= _PENDING_MAX:
            older = pending[: _PENDING_MAX // 2]
            del pending[: _PENDING_MAX // 2]
            await self.outage.acked(older)  # acknowledged long ago: returns (or raises) at once
        now = time.monotonic()
        if now - self._last_yield > _YIELD_EVERY_S:
            self._last_yield = now
            if now - self._last_flush >= _FLUSH_EVERY_S:
                await out.flush()
                self._last_flush = now
            await asyncio.sleep(0)  # the sender, and signal handlers
        if (
            self._checkpoint_cb is not None
            and now - self._last_checkpoint >= self._checkpoint_every_s
        ):
            await self._checkpoint(out, complete=False)
            self._last_checkpoint = self._last_flush = time.monotonic()
        if now - self._last_progress > 0.25:
            self._last_progress = now
            if self._on_progress is not None:
                self._on_progress(self.stats)


__all__ = ["BrokerOutage", "ReplayStats", "Replayer", "TopicLost"]
