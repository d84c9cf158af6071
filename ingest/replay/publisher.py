"""Publishes a replay source to ``md.raw`` at a chosen speed.

Pacing follows the source's own timestamps: message i is due at
``start + (ts_i - ts_0) / speed``. The publisher sleeps only when it is ahead
of schedule; when the broker or the source cannot keep up it runs behind, and
the drift (how late messages went out) is measured and reported instead of
being hidden. Partitioning is computed here (Kafka's murmur2 over the
instrument key) so each partition's records carry their own gap-free feed
sequence number, and market-wide messages are copied to every partition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder

from ingest.manifest import Manifest, ManifestBuilder
from ingest.replay.source import NS, RawMessage
from tickscale.constants import HDR_BROADCAST, HDR_CODEC, HDR_DATE, HDR_SEQ

log = logging.getLogger(__name__)

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

    def __init__(self, producer: AIOKafkaProducer, topic: str, partitions: int) -> None:
        self._producer = producer
        self._topic = topic
        self._open: list[BatchBuilder | None] = [None] * partitions
        self._last: list[asyncio.Future[Any] | None] = [None] * partitions
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
        fut = await self._producer.send_batch(b, self._topic, partition=partition)
        self._last[partition] = fut
        self.pending.append(fut)


def partition_for(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner, so keyed records land where Java clients put them."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass
class ReplayStats:
    source_messages: int = 0
    records: int = 0
    started: float = 0.0
    elapsed: float = 0.0
    source_clock_ns: int = 0
    drift_samples: list[float] = field(default_factory=list)

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
    ) -> None:
        if speed is not None and speed <= 0:
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
        self._stop = asyncio.Event()

    @property
    def interrupted(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop after the message in flight; what was sent is still in the manifest."""
        self._stop.set()

    async def run(self) -> Manifest:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,  # retries must not duplicate or reorder raw input
            linger_ms=5,
            max_batch_size=self.batch_bytes,
            max_request_size=4 * 1024 * 1024,
        )
        await producer.start()
        try:
            parts = await producer.partitions_for(self.topic)
            if not parts:
                raise RuntimeError(f"topic {self.topic!r} does not exist")
            self.partitions = len(parts)
            await self._send_all(producer)
            await producer.flush()
        finally:
            await producer.stop()
        st = self.stats
        st.elapsed = time.monotonic() - st.started if st.started else 0.0
        return self.builder.build(
            source="",
            topic=self.topic,
            partitions=self.partitions,
            records_sent=st.records,
            pacing={
                "speed": self.speed or 0.0,
                "elapsed_s": round(st.elapsed, 3),
                **{"drift_" + k: v for k, v in st.drift_summary().items()},
            },
        )

    async def _send_all(self, producer: AIOKafkaProducer) -> None:
        n_parts = self.partitions
        seqs = [0] * n_parts
        st = self.stats
        day_hdr = self.day.encode()
        out = _Batches(producer, self.topic, n_parts)
        pending = out.pending
        first_ts: int | None = None
        st.started = time.monotonic()
        last_progress = 0.0
        last_yield = last_flush = st.started
        builder = self.builder
        speed = self.speed
        for m in self.source:
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
            targets = range(n_parts) if m.key is None else (partition_for(m.key, n_parts),)
            codec_hdr = _CODEC_HDR[m.codec]
            for p in targets:
                seqs[p] += 1
                headers = [(HDR_CODEC, codec_hdr), (HDR_SEQ, str(seqs[p]).encode())]
                if m.codec == "itch":
                    headers.append((HDR_DATE, day_hdr))
                if m.key is None:
                    headers.append((HDR_BROADCAST, b"1"))
                if not out.add(p, m.key, m.payload, headers):
                    await out.add_full(p, m.key, m.payload, headers)
                st.records += 1
            if self._manifest:
                builder.observe(m.payload, m.codec, self.day, len(targets))
            st.source_messages += 1
            st.source_clock_ns = m.ts_ns
            if len(pending) >= _PENDING_MAX:
                older = pending[: _PENDING_MAX // 2]
                del pending[: _PENDING_MAX // 2]
                for fut in older:
                    await fut  # acknowledged long ago: returns (or raises) at once
            now = time.monotonic()
            if now - last_yield > _YIELD_EVERY_S:
                last_yield = now
                if now - last_flush >= _FLUSH_EVERY_S:
                    await out.flush()
                    last_flush = now
                await asyncio.sleep(0)  # the sender, and signal handlers
            if now - last_progress > 0.25:
                last_progress = now
                if self._on_progress is not None:
                    self._on_progress(st)
        await out.flush(wait=True)
        if pending:
            await asyncio.gather(*pending)
        if self._on_progress is not None:
            self._on_progress(st)
