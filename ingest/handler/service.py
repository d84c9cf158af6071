"""The feed handler process: a consumer-group member running partition workers.

Lifecycle: ``start()`` opens the HTTP probe endpoint, Redis and the consumer;
``run()`` polls until ``stop()`` or SIGTERM; ``stop()`` lets the batch in
flight commit, saves snapshots, leaves the group (so the partitions move at
once rather than after the session timeout) and closes every client.

Rebalances are eager in aiokafka: on revocation the current batch is allowed
to finish and commit (the processing lock), then the partition's producer is
closed; on assignment each new partition gets its own transactional producer,
whose initialisation fences the previous owner, and its state is restored
before the first new tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from ingest import metrics
from ingest.handler.partition import Outputs, PartitionWorker, transactional_id
from ingest.handler.redis_sink import RedisSink
from ingest.handler.settings import HandlerSettings
from tickscale.http import HealthServer
from tickscale.runtime import stop_on_signals

log = logging.getLogger(__name__)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, handler: FeedHandler) -> None:
        self.h = handler

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.h._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.h._on_assigned(assigned)


class FeedHandler:
    """One feed-handler process. Use ``async with FeedHandler(s) as h: await h.run()``."""

    def __init__(self, settings: HandlerSettings) -> None:
        self.s = settings
        self.workers: dict[TopicPartition, PartitionWorker] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.sink: RedisSink | None = None
        self.http: HealthServer | None = None
        self.outputs: Outputs | None = None
        self._plain_producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._started = False
        self._joined = False
        self._fatal: BaseException | None = None
        self.messages = 0
        self.busy_s = 0.0
        # The scaler's capacity model separates the two parts of a busy second: CPU
        # (grows with the messages) and waits on the broker (grows with the batches).
        self.cpu_s = 0.0
        self.batches = 0
        self.rebalances = 0  # revocations seen; a poll across one holds stale records

    async def __aenter__(self) -> FeedHandler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # Lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.s
        self.http = HealthServer(s.metrics_host, s.metrics_port, self._healthy, self._ready)
        await self.http.start()
        log.info("handler %s: metrics on port %d", s.handler_id, self.http.port)
        if s.redis_url:
            self.sink = RedisSink(s.redis_url, s.handler_id)
            await self.sink.start()
        probe = AIOKafkaProducer(bootstrap_servers=s.bootstrap)
        await probe.start()
        try:
            out_parts = await probe.partitions_for(s.out_topic)
            if not out_parts:
                raise RuntimeError(f"output topic {s.out_topic!r} does not exist")
        finally:
            await probe.stop()
        self.outputs = Outputs(s.out_topic, len(out_parts), s.deadletter_topic)
        if not s.eos:
            self._plain_producer = AIOKafkaProducer(
                bootstrap_servers=s.bootstrap, acks="all", enable_idempotence=True, linger_ms=2
            )
            await self._plain_producer.start()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap,
            group_id=s.group,
            client_id=s.handler_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=s.max_batch,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_wait_ms=s.poll_timeout_ms,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            # Restores can replay many records inside the assignment callback.
            rebalance_timeout_ms=120_000,
            max_poll_interval_ms=300_000,
        )
        self.consumer.subscribe([s.in_topic], listener=_Listener(self))
        await self.consumer.start()
        self._started = True

    def request_stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        stop_on_signals(asyncio.get_running_loop(), self.request_stop)

    async def stop(self) -> None:
        self._stop.set()
        async with self._lock:  # the batch in flight commits first
            for w in self.workers.values():
                w.save_snapshot()
        if self.sink is not None:
            await self.sink.flush()  # before leaving: the next owners restore from these
        if self.consumer is not None:
            # Leaves the group; the revoke callback closes the partition producers.
            with contextlib.suppress(KafkaError):
                await self.consumer.stop()
            self.consumer = None
        for tp in list(self.workers):
            await self._close_worker(tp)
        if self._plain_producer is not None:
            await self._plain_producer.stop()
            self._plain_producer = None
        if self.sink is not None:
            await self.sink.stop()
            self.sink = None
        if self.http is not None:
            await self.http.stop()
            self.http = None
        self._started = False
        log.info("handler %s stopped after %d messages", self.s.handler_id, self.messages)

    # Probes -------------------------------------------------------------------------------

    def _healthy(self) -> bool:
        return self._fatal is None

    def _ready(self) -> bool:
        return self._started and self._joined and self._fatal is None

    # Rebalance callbacks --------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.rebalances += 1
        async with self._lock:
            for tp in revoked:
                w = self.workers.get(tp)
                if w is not None:
                    w.save_snapshot()
                await self._close_worker(tp)
            if self.sink is not None:
                # Written before this member rejoins, so the partitions' next owners
                # restore from the committed offset itself instead of replaying from
                # an older snapshot.
                await self.sink.flush()
        metrics.ASSIGNED.set(len(self.workers))

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        metrics.REBALANCES.inc()
        async with self._lock:
            await asyncio.gather(
                *(self._open_worker(tp) for tp in assigned if tp not in self.workers)
            )
        self._joined = True
        metrics.ASSIGNED.set(len(self.workers))
        log.info("assigned %s", sorted(tp.partition for tp in assigned))

    async def _open_worker(self, tp: TopicPartition) -> None:
        s = self.s
        assert self.consumer is not None and self.outputs is not None
        if s.eos:
            producer = AIOKafkaProducer(
                bootstrap_servers=s.bootstrap,
                transactional_id=transactional_id(s.group, tp.topic, tp.partition),
                enable_idempotence=True,
                acks="all",
                linger_ms=2,
                max_batch_size=512 * 1024,
                transaction_timeout_ms=60_000,
                # Back-to-back transactions race the previous commit's markers; the
                # broker answers a produce in that window with a retriable
                # NOT_ENOUGH_REPLICAS (transaction verification, KIP-890). aiokafka's
                # default 100 ms backoff then dominated end-to-end latency.
                retry_backoff_ms=5,
            )
            # start() runs InitProducerId: this is the fence against the old owner,
            # and it waits for the old owner's open transaction to finish first, so
            # the committed offset read below is final.
            await producer.start()
        else:
            assert self._plain_producer is not None
            producer = self._plain_producer
        w = PartitionWorker(
            tp, s.group, producer, self.outputs, s.eos, self.sink, s.snapshot_interval_s
        )
        committed = await self.consumer.committed(tp)
        await w.restore(s.bootstrap, committed)
        self.workers[tp] = w
        # An immediate seek, never seek_to_beginning(): that one is applied lazily
        # and can rewind the position after a batch was already consumed. Offset 0
        # on a trimmed log falls back to the earliest offset via auto_offset_reset.
        self.consumer.seek(tp, committed or 0)

    async def _close_worker(self, tp: TopicPartition) -> None:
        w = self.workers.pop(tp, None)
        with contextlib.suppress(KeyError):
            metrics.PARTITION_LAG.remove(str(tp.partition))
        if w is not None and w.eos:
            with contextlib.suppress(KafkaError, AssertionError):
                await w.producer.stop()

    # Main loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until ``stop()``. Raises the error that made the handler give up, if
        one did, so the process exits non-zero and its supervisor replaces it."""
        assert self.consumer is not None
        consumer = self.consumer
        last_stats = 0.0
        while not self._stop.is_set():
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=self.s.max_batch)
            except KafkaError as e:
                log.warning("fetch failed: %s", e)
                await asyncio.sleep(0.5)
                continue
            if batches and self.s.fetch_topup_ms:
                batches = await self._top_up(consumer, batches)
            if batches:
                async with self._lock:
                    t0 = time.monotonic()
                    c0 = time.process_time()
                    # Partitions commit independent transactions: run them
                    # concurrently so their broker round trips overlap.
                    work = [
                        (w, records)
                        for tp, records in batches.items()
                        if records and (w := self.workers.get(tp)) is not None
                    ]  # a missing worker was revoked while the fetch was in flight
                    ok = await asyncio.gather(*(self._process(w, r) for w, r in work))
                    done = {
                        w.tp: w.committed for (w, _), good in zip(work, ok, strict=True) if good
                    }
                    if done and not self.s.eos:
                        # At-least-once: offsets after the output is acknowledged.
                        try:
                            await consumer.commit(done)
                        except KafkaError as e:
                            log.warning("offset commit failed (%s); batch may repeat", e)
                    dt = time.monotonic() - t0
                    self.busy_s += dt
                    self.cpu_s += time.process_time() - c0
                    self.batches += 1
                    metrics.BUSY.inc(dt)
            now = time.monotonic()
            if now - last_stats >= 1.0:
                last_stats = now
                self._report(consumer)
                self._check_parent()
        if self._fatal is not None:
            raise self._fatal

    async def _top_up(
        self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[Any]]
    ) -> dict[TopicPartition, list[Any]]:
        """Add the records that reached the broker while ``batches`` sat in the buffer.

        The consumer sends no fetch to a broker while it holds unconsumed records
        of any partition that broker leads. So what a poll returns was fetched
        early in the previous batch and has waited a whole batch, and what
        arrived since is still on the broker. The poll emptied the buffer, which
        started a fetch at once; waiting for it (one round trip) takes those
        records into this batch instead of the one after.
        """
        room = self.s.max_batch - sum(len(r) for r in batches.values())
        if room <= 0:
            return batches
        rebalances = self.rebalances
        try:
            more = await consumer.getmany(timeout_ms=self.s.fetch_topup_ms, max_records=room)
        except KafkaError as e:
            log.warning("fetch failed: %s", e)
            more = {}
        if self.rebalances != rebalances:
            # The poll's records predate a rebalance (the wait can span one):
            # the partitions kept were moved back to their committed offsets
            # and are fetched again from there.
            return more
        for tp, recs in more.items():
            polled = batches.get(tp)
            if polled and recs[0].offset <= polled[-1].offset:
                # An assignment callback (a slow restore) can run while the poll
                # returns, and its seek fetches those records again: the poll's
                # copy is the stale one.
                batches[tp] = recs
            else:
                batches.setdefault(tp, []).extend(recs)
        return batches

    async def _process(self, w: PartitionWorker, records: list[Any]) -> bool:
        assert self.consumer is not None
        t0 = time.monotonic()
        try:
            consumed = await w.process(records)
        except Exception as e:  # any failure leaves state ahead of the commit
            metrics.TXN_ABORTS.labels(type(e).__name__).inc()
            log.warning("%s: batch failed (%r); aborting and restoring", w.tp, e)
            await self._recover(w)
            return False
        self.messages += consumed
        metrics.PROCESSING.observe(time.monotonic() - t0)
        return True

    async def _recover(self, w: PartitionWorker) -> None:
        """Abort, then rebuild the partition from its committed offset."""
        assert self.consumer is not None
        tp = w.tp
        if w.eos:
            with contextlib.suppress(Exception):
                await w.producer.abort_transaction()
        await self._close_worker(tp)
        if tp not in self.consumer.assignment():
            return
        for attempt in range(30):
            try:
                await self._open_worker(tp)
                return
            except Exception as e:
                log.warning("%s: reopen failed (%r), retry %d", tp, e, attempt + 1)
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
        self._fatal = RuntimeError(f"cannot recover {tp}")
        self._stop.set()

    def _check_parent(self) -> None:
        """An orphan would keep consuming outside any fleet its owner's successor sees,
        which could then neither count it nor stop it."""
        pid = self.s.parent_pid
        if pid is not None and os.getppid() != pid and not self._stop.is_set():
            log.warning("parent process %d is gone; draining and leaving the group", pid)
            self.request_stop()

    def _report(self, consumer: AIOKafkaConsumer) -> None:
        for tp, w in self.workers.items():
            hw = consumer.highwater(tp)
            if hw is not None:
                metrics.PARTITION_LAG.labels(str(tp.partition)).set(max(0, hw - w.committed))
        if self.sink is not None:
            self.sink.stats(self.messages, self.busy_s, self.cpu_s, self.batches, self.s.max_batch)
