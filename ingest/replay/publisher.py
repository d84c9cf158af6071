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
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.producer.message_accumulator import BatchBuilder

from core.constants import HDR_BROADCAST, HDR_CODEC, HDR_DATE, HDR_SEQ
from core.topology import partitions_of
from ingest.codecs.errors import SourceError
from ingest.kafka_metadata import throttle_metadata_updates
from ingest.keys import partition_for
from ingest.manifest import Manifest, ManifestBuilder
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
# A wait for the broker says so on the console after this long.
_OUTAGE_NOTICE_S = 5.0


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Hold back a logger's lines: each failed connection attempt of the client is
    one, where the replay says once what is wrong."""
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class BrokerOutage(RuntimeError):
    """The broker acknowledged nothing for the replay's outage deadline."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = where
        self.what = what


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

    def drift_summary(self) -> dict[str, float]:
        d = sorted(self.drift_samples)
        if not d:
            return {"p50_s": 0.0, "p99_s": 0.0, "max_s": 0.0}
        return {
            "p50_s": round(d[len(d) // 2], 4),
            "p99_s": round(d[min(len(d) - 1, int(len(d) * 0.99))], 4),
            "max_s": round(d[-1], 4),
        }


class Replayer:
    """Sends a source to Kafka and builds the manifest of what it sent.

    :param bootstrap: Kafka bootstrap servers
    :param topic: raw topic (``md.raw``)
    :param source: messages in feed order
    :param speed: 1.0 = real time, 60 = a minute per second, None = as fast as possible
    :param day: trading date (ISO) stamped on ITCH records so handlers can build
        absolute event times from ITCH's time-since-midnight
    :param checkpoint: called with the manifest of what the broker acknowledged,
        every ``checkpoint_every_s`` and when the replay ends, however it ends
        (``complete`` is true only when the whole source was sent)
    :param resume: the manifest of an earlier run of the same replay: the messages
        it counts are not sent again, nor those of its records that reached the
        broker after it was written
    :param outage_deadline_s: how long the broker may acknowledge nothing before
        the replay gives up (BrokerOutage)
    :param connect_timeout_s: how long to wait for a broker before the first record
    """

    batch_bytes = 512 * 1024  # per partition and request

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        source: Iterable[RawMessage],
        speed: float | None,
        day: str,
        on_progress: Any = None,
        manifest: bool = True,
        *,
        checkpoint: Callable[[Manifest], None] | None = None,
        checkpoint_every_s: float = 5.0,
        resume: Manifest | None = None,
        outage_deadline_s: float = 300.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if speed is not None and not speed > 0:
            raise ValueError("speed must be > 0 or 'max'")
        self.bootstrap = bootstrap
        self.topic = topic
        self.source = source
        self.speed = speed
        self.day = day
        self.stats = ReplayStats()
        self.builder = ManifestBuilder()
        self.partitions = 0
        self._on_progress = on_progress
        self._manifest = manifest  # off only where nothing will be verified (benchmarks)
        self._checkpoint_cb = checkpoint if manifest else None
        self._checkpoint_every_s = checkpoint_every_s
        self._resume = resume
        self.outage_deadline_s = outage_deadline_s
        self.connect_timeout_s = connect_timeout_s
        self._stop = asyncio.Event()
        self._seqs: list[int] = []
        # Per partition: records numbered up to this are on the broker already.
        self._on_broker: list[int] = []
        self._skip_messages = resume.source_messages if resume is not None else 0
        self._last_ack = 0.0
        self.complete = False

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
        self.partitions = len(await self._preflight())
        self._seqs = [0] * self.partitions
        self._on_broker = [0] * self.partitions
        landed = [0] * self.partitions
        prev = self._resume
        if prev is not None:
            if prev.partitions != self.partitions:
                raise SourceError(
                    f"--topic {self.topic}",
                    f"has {self.partitions} partitions, the resumed replay sent to "
                    f"{prev.partitions}",
                )
            landed = await self._landed_after(prev)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            # Retries keep a batch's sequence numbers, so the broker stores it once
            # however often it is sent; idempotent batches are retried without end
            # (the outage deadline is this publisher's), and their time in the
            # queue must outlast the deadline too, or it would fail them first.
            enable_idempotence=True,
            request_timeout_ms=int((self.outage_deadline_s + 60) * 1000),
            retry_backoff_ms=500,
            linger_ms=5,
            max_batch_size=self.batch_bytes,
            max_request_size=4 * 1024 * 1024,
        )
        throttle_metadata_updates(producer, 0.5)
        await producer.start()
        out = _Batches(producer, self.topic, self.partitions, self._guard, self._acked_one)
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

    async def _preflight(self) -> list[int]:
        """The topic's partitions, waiting up to ``connect_timeout_s`` for a broker."""
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            try:
                with _quiet(logging.getLogger("aiokafka")):
                    return await partitions_of(self.bootstrap, self.topic)
            except (KafkaError, OSError):  # KafkaError is a RuntimeError: first
                if time.monotonic() >= deadline:
                    raise SourceError(
                        f"--bootstrap {self.bootstrap}",
                        f"no broker answered within {self.connect_timeout_s:g} s "
                        "(is it running, is the address right?)",
                    ) from None
            except RuntimeError:
                raise SourceError(
                    f"--topic {self.topic}",
                    f"no such topic on {self.bootstrap} (create it: tickscale topics)",
                ) from None
                await asyncio.sleep(1.0)

    async def _landed_after(self, prev: Manifest) -> list[int]:
        """Records of each partition that reached the broker after ``prev`` was written.

        The run that wrote ``prev`` may have stopped with records sent and not yet
        acknowledged, or acknowledged since its last checkpoint. They carry the feed
        sequence numbers that follow the manifest's, and timestamps from after it.
        """
        n = self.partitions
        seqs = prev.partition_seqs or [0] * n
        landed = [0] * n
        if not prev.acked_at_ms:
            return landed
        # Timestamps are this machine's (create time) or the broker's (append time):
        # a margin for the broker's clock. What it adds is numbered up to the
        # manifest's and not counted.
        since = prev.acked_at_ms - 60_000
        tps = [TopicPartition(self.topic, p) for p in range(n)]
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None
        )
        await consumer.start()
        try:
            consumer.assign(tps)
            starts = await consumer.offsets_for_times({tp: since for tp in tps})
            ends = await consumer.end_offsets(tps)
            todo: dict[TopicPartition, int] = {}
            for tp in tps:
                at = starts.get(tp)
                if at is not None and at.offset < ends[tp]:
                    consumer.seek(tp, at.offset)
                    todo[tp] = ends[tp]
            while todo:
                batch = await consumer.getmany(*todo, timeout_ms=1000)
                for tp, records in batch.items():
                    p = tp.partition
                    for r in records:
                        seq = dict(r.headers).get(HDR_SEQ)
                        if seq is not None and seq.isdigit():
                            if int(seq) == seqs[p] + landed[p] + 1:
                                landed[p] += 1
                for tp in list(todo):
                    if await consumer.position(tp) >= todo[tp]:
                        del todo[tp]
        finally:
            await consumer.stop()
        if any(landed):
            log.info("resume: %d records already on the broker are not sent again", sum(landed))
        return landed

    def _acked_one(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._last_ack = time.monotonic()

    async def _guard(self, aw: Awaitable[T]) -> T:
        """Wait for ``aw`` while the broker keeps acknowledging something; BrokerOutage
        once it has acknowledged nothing for ``outage_deadline_s``."""
        fut = asyncio.ensure_future(aw)
        if fut.done():
            return fut.result()
        began = time.monotonic()
        noticed = False
        quiet_client = contextlib.ExitStack()
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=1.0)
                if done:
                    break
                quiet = time.monotonic() - max(began, self._last_ack)
                if quiet > self.outage_deadline_s:
                    raise BrokerOutage(
                        f"--bootstrap {self.bootstrap}",
                        f"the broker acknowledged nothing for {quiet:.0f} s "
                        f"(--outage-deadline {self.outage_deadline_s:g}); the manifest counts "
                        "what it acknowledged",
                    )
                if self._stop.is_set() and quiet > _OUTAGE_NOTICE_S:
                    # Asked to stop: not kept waiting for a broker that is away.
                    raise BrokerOutage(
                        f"--bootstrap {self.bootstrap}",
                        f"stopped while the broker acknowledged nothing ({quiet:.0f} s); the "
                        "manifest counts what it acknowledged",
                    )
                if quiet > _OUTAGE_NOTICE_S and not noticed:
                    noticed = True
                    # The client logs each failed connection; this line says it once.
                    quiet_client.enter_context(_quiet(logging.getLogger("aiokafka")))
                    log.warning(
                        "the broker at %s has acknowledged nothing for %.0f s; retrying for up "
                        "to %g s",
                        self.bootstrap,
                        quiet,
                        self.outage_deadline_s,
                    )
        except BaseException:
            if not fut.done() and not isinstance(aw, asyncio.Future):
                fut.cancel()  # a send not yet queued: nothing of it reaches the broker
            raise
        finally:
            quiet_client.close()
        if noticed:
            log.warning("the broker at %s acknowledges again", self.bootstrap)
        try:
            return fut.result()
        except KafkaTimeoutError:
            raise BrokerOutage(
                f"--bootstrap {self.bootstrap}",
                f"the broker did not take a batch within the producer's timeout "
                f"(--outage-deadline {self.outage_deadline_s:g})",
            ) from None

    async def _acked(self, futs: list[asyncio.Future[Any]]) -> None:
        for fut in futs:
            if fut.done():
                fut.result()  # raises the broker's error, if any
            else:
                await self._guard(fut)

    async def _checkpoint(self, out: _Batches, complete: bool) -> Manifest:
        """Send what is open, wait for the broker to acknowledge everything sent, and
        hand over the manifest of it."""
        await out.flush(wait=True)
        pending = out.pending[:]
        out.pending.clear()
        await self._acked(pending)
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
            pacing={
                "speed": self.speed or 0.0,
                "elapsed_s": round(st.elapsed, 3),
                **{"drift_" + k: v for k, v in st.drift_summary().items()},
            },
        )
        if self._checkpoint_cb is not None:
            self._checkpoint_cb(m)
        return m

    async def _send_all(self, out: _Batches, landed: list[int]) -> None:
        n_parts = self.partitions
        seqs = self._seqs
        st = self.stats
        day_hdr = self.day.encode()
        pending = out.pending
        prev = self._resume
        skip_messages = self._skip_messages
        on_broker = self._on_broker
        for p in range(n_parts):
            counted = prev.partition_seqs[p] if prev is not None and prev.partition_seqs else 0
            on_broker[p] = counted + landed[p]
        first_ts: int | None = None
        st.started = time.monotonic()
        self._last_ack = st.started
        last_progress = 0.0
        last_yield = last_flush = last_checkpoint = st.started
        builder = self.builder
        speed = self.speed
        checkpoints = self._checkpoint_cb is not None
        for m in self.source:
            targets = range(n_parts) if m.key is None else (partition_for(m.key, n_parts),)
            # Not stopped while skipping: a manifest counting less than the resumed
            # one would have what it counted sent again.
            if st.source_messages < skip_messages:
                # Sent by the run being resumed: only its numbering and its share of
                # the manifest are rebuilt.
                for p in targets:
                    seqs[p] += 1
                if self._manifest:
                    builder.observe(m.payload, m.codec, self.day, len(targets))
                st.source_messages += 1
                st.resumed_messages += 1
                st.records += len(targets)
                st.resumed_records += len(targets)
                continue
            if self._stop.is_set():
                break
            if first_ts is None:
                first_ts = m.ts_ns
            if speed is not None:
                due = st.started + (m.ts_ns - first_ts) / NS / speed
                ahead = due - time.monotonic()
                if ahead > 0.002:
                    if due - last_flush >= _FLUSH_EVERY_S:
                        # Everything, rather than hold a batch through the sleep.
                        await out.flush(wait=True)
                        last_flush = time.monotonic()
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    last_yield = due
                else:
                    # Sample lateness sparsely: one in 64 is plenty for percentiles.
                    if st.source_messages & 63 == 0:
                        st.drift_samples.append(max(0.0, -ahead))
            codec_hdr = _CODEC_HDR[m.codec]
            for p in targets:
                seqs[p] += 1
                st.records += 1
                if seqs[p] <= on_broker[p]:
                    continue
                headers = [(HDR_CODEC, codec_hdr), (HDR_SEQ, str(seqs[p]).encode())]
                if m.codec == "itch":
                    headers.append((HDR_DATE, day_hdr))
                if m.key is None:
                    headers.append((HDR_BROADCAST, b"1"))
                if not out.add(p, m.key, m.payload, headers):
                    await out.add_full(p, m.key, m.payload, headers)
            if self._manifest:
                builder.observe(m.payload, m.codec, self.day, len(targets))
            st.source_messages += 1
            st.source_clock_ns = m.ts_ns
            if len(pending) >= _PENDING_MAX:
                older = pending[: _PENDING_MAX // 2]
                del pending[: _PENDING_MAX // 2]
                await self._acked(older)  # acknowledged long ago: returns (or raises) at once
            now = time.monotonic()
            if now - last_yield > _YIELD_EVERY_S:
                last_yield = now
                if now - last_flush >= _FLUSH_EVERY_S:
                    await out.flush()
                    last_flush = now
                await asyncio.sleep(0)  # the sender, and signal handlers
            if checkpoints and now - last_checkpoint >= self._checkpoint_every_s:
                await self._checkpoint(out, complete=False)
                last_checkpoint = last_flush = time.monotonic()
            if now - last_progress > 0.25:
                last_progress = now
                if self._on_progress is not None:
                    self._on_progress(st)
        if self._on_progress is not None:
            self._on_progress(st)
