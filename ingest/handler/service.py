"""The feed handler process: a consumer-group member running partition workers.

Lifecycle: ``start()`` opens the HTTP probe endpoint, Redis and the consumer;
``run()`` polls until ``stop()`` or SIGTERM; ``stop()`` lets the batch in
flight commit, saves snapshots, leaves the group (so the partitions move at
once rather than after the session timeout) and closes every client. A stop
ends within ``stop_grace_s`` whatever the handler is doing: a restore gives up,
and a batch that cannot commit in time is abandoned and its transaction aborted.

State proves its incarnation: offset commits and snapshots carry the input
topic's id (incarnation.py), and a partition's restore ignores state of
another incarnation, or an offset beyond the log end, and starts from the log
start instead.

Each poll is one transaction: every partition's ticks, dead letters and offsets
(fencing.py says why a stale owner cannot commit one). Rebalances are eager in
aiokafka: on revocation the batch in flight is allowed to commit first (the
processing lock); on assignment each new partition's start offset is read once
no open transaction holds one for it, and its state is restored before the
first new tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from core.http import HealthServer, PortInUse
from core.runtime import stop_on_signals
from ingest import metrics
from ingest.handler.fencing import (
    Committed,
    FencedProducer,
    GroupMetadata,
    Unstable,
    fetch_committed,
    stale_transactions,
)
from ingest.handler.incarnation import judge_committed, offset_metadata, topic_id
from ingest.handler.partition import Batch, Outputs, PartitionWorker
from ingest.handler.poison import PoisonTracker, may_be_the_records
from ingest.handler.redis_sink import RedisSink
from ingest.handler.retry_log import PRODUCE_RETRIES
from ingest.handler.settings import HandlerSettings
from ingest.kafka_metadata import throttle_metadata_updates

log = logging.getLogger(__name__)


def transactional_id(group: str, handler_id: str) -> str:
    """The handler's producer. Its consumer's client id is the handler id, so the
    group's membership tells which open transactions have lost their owner
    (``_committed``); its offset commits name it too, for whoever reads the offsets."""
    return f"tickscale.{group}.{handler_id}"


class _Stopping(Exception):
    """The handler is stopping: a partition's restore is given up."""


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
        self.producer: AIOKafkaProducer | None = None
        self.txn_id = transactional_id(settings.group, settings.handler_id)
        # What each offset commit carries: the transactional id and the input topic's
        # id, learnt on assignment (before any commit).
        self.offset_metadata = offset_metadata(self.txn_id, None)
        self.topic_id: str | None = None
        self._lock = asyncio.Lock()
        self._fence_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._stop_deadline: float | None = None  # monotonic; set by the first stop request
        self._run_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._abandoned = False  # the batch in flight was given up at a stop
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
        self._poison = PoisonTracker(settings.poison_after)
        self._failed_in_a_row = 0  # failed commits since the last one that succeeded

    async def __aenter__(self) -> FeedHandler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # Lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.s
        PRODUCE_RETRIES.install()  # once per process; adding the same filter again is a no-op
        self.http = HealthServer(s.metrics_host, s.metrics_port, self._healthy, self._ready)
        try:
            await self.http.start()
        except PortInUse:
            # A port given explicitly is someone's scrape target: never serve elsewhere.
            if "metrics_port" in s.model_fields_set:
                raise
            self.http = HealthServer(s.metrics_host, 0, self._healthy, self._ready)
            await self.http.start()
            log.warning(
                "handler %s: the default metrics port %d is in use; serving metrics on port "
                "%d instead (--metrics-port N chooses one)",
                s.handler_id,
                s.metrics_port,
                self.http.port,
            )
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
        await self._open_producer()
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
        """Start stopping: the handler is closed ``stop_grace_s`` from now at the latest."""
        if self._stop_deadline is None:
            grace = self.s.stop_grace_s
            self._stop_deadline = time.monotonic() + grace
            task = self._run_task
            if task is not None and not task.done():
                # The batch in flight gets part of the grace to commit; the rest is
                # for leaving the group and closing the clients.
                self._watchdog = asyncio.get_running_loop().call_later(
                    0.4 * grace, self._abandon_batch
                )
        self._stop.set()

    def _abandon_batch(self) -> None:
        task = self._run_task
        if task is not None and not task.done():
            log.warning(
                "handler %s: the batch in flight did not finish within %.1fs of the stop; "
                "abandoning it (its transaction is aborted)",
                self.s.handler_id,
                0.4 * self.s.stop_grace_s,
            )
            self._abandoned = True
            task.cancel()

    def _left(self) -> float:
        """Seconds left of the stop grace."""
        if self._stop_deadline is None:
            return self.s.stop_grace_s
        return max(0.0, self._stop_deadline - time.monotonic())

    def install_signal_handlers(self) -> None:
        stop_on_signals(asyncio.get_running_loop(), self.request_stop)

    async def stop(self) -> None:
        """Commit or abort what is held, save snapshots, leave the group, close: each
        step within what is left of ``stop_grace_s``, skipped once it has run out."""
        self.request_stop()  # (the watchdog stays armed while run() is still busy)
        try:
            # Half the grace at most: the rest is for leaving the group and closing.
            async with asyncio.timeout(max(0.1, self._left() - 0.5 * self.s.stop_grace_s)):
                async with self._lock:  # the batch in flight commits first
                    if not self._abandoned:
                        # (An abandoned batch left the state ahead of the commit.)
                        for w in self.workers.values():
                            w.save_snapshot()
        except TimeoutError:
            # A restore or a commit still holds the lock: the state is not at a
            # committed offset, so no snapshot.
            log.warning("stop: the partitions are still busy; no snapshots saved")
        if self.sink is not None:
            # Before leaving: the next owners restore from these.
            await self._bounded("flush Redis", self.sink.flush())
        if self.consumer is not None:
            # Leaves the group; the revoke callback closes the partition producers.
            await self._bounded("leave the group", self.consumer.stop(), KafkaError)
            self.consumer = None
        for tp in list(self.workers):
            self._close_worker(tp)
        if self.producer is not None:
            p, self.producer = self.producer, None
            open_txn = isinstance(p, FencedProducer) and p._txn_manager.is_in_transaction()
            await self._bounded("close the producer", p.stop(), KafkaError, AssertionError)
            if open_txn:
                # Aborts it now rather than when it times out, which would hold the
                # partitions' next owners back until then.
                await self._bounded(
                    "abort the open transaction", self._fence(self.txn_id), KafkaError
                )
        if self.sink is not None:
            await self._bounded("close Redis", self.sink.stop())
            self.sink = None
        if self.http is not None:
            await self.http.stop()
            self.http = None
        self._started = False
        log.info("handler %s stopped after %d messages", self.s.handler_id, self.messages)

    async def _bounded(
        self, what: str, step: Awaitable[object], *tolerated: type[BaseException]
    ) -> None:
        """One step of ``stop()``, given what is left of the grace (one second at least:
        a skipped close leaves more behind than a slightly late one)."""
        try:
            async with asyncio.timeout(max(1.0, self._left())):
                await step
        except TimeoutError:
            log.warning("stop: could not %s within the stop grace; skipped", what)
        except tolerated as e:
            log.warning("stop: could not %s (%r)", what, e)

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
                self._close_worker(tp)
            if self.sink is not None:
                # Written before this member rejoins, so the partitions' next owners
                # restore from the committed offset itself instead of replaying from
                # an older snapshot.
                await self.sink.flush()
        metrics.ASSIGNED.set(len(self.workers))

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        metrics.REBALANCES.inc()
        async with self._lock:
            # A partition left without a worker would stall unseen until the next
            # rebalance: a restore that keeps failing fails the handler instead.
            await asyncio.gather(
                *(
                    self._retry(f"restore {tp}", functools.partial(self._open_worker, tp))
                    for tp in assigned
                    if tp not in self.workers
                )
            )
        metrics.ASSIGNED.set(len(self.workers))
        if self._stop.is_set():
            return  # the restores gave up (logged): nothing was taken on
        self._joined = True
        log.info("assigned %s", sorted(tp.partition for tp in assigned))

    async def _open_producer(self) -> None:
        s = self.s
        if not s.eos:
            self.producer = AIOKafkaProducer(
                bootstrap_servers=s.bootstrap, acks="all", enable_idempotence=True, linger_ms=2
            )
        else:
            self.producer = FencedProducer(
                bootstrap_servers=s.bootstrap,
                transactional_id=self.txn_id,
                enable_idempotence=True,
                acks="all",
                linger_ms=2,
                max_batch_size=512 * 1024,
                transaction_timeout_ms=s.transaction_timeout_ms,
                # Back-to-back transactions race the previous commit's markers; the
                # broker answers a produce in that window with a retriable
                # NOT_ENOUGH_REPLICAS (transaction verification, KIP-890). aiokafka's
                # default 100 ms backoff then dominated end-to-end latency.
                retry_backoff_ms=5,
            )
        # Its 5 ms retry backoff also paces metadata requests while a partition has no
        # leader: without this, a broker restart costs a core and a log line per retry.
        throttle_metadata_updates(self.producer, 0.5)
        await self.producer.start()

    async def _open_worker(self, tp: TopicPartition) -> None:
        s = self.s
        consumer = self.consumer
        assert consumer is not None and self.outputs is not None
        w = PartitionWorker(tp, s.group, self.outputs, self.sink, s.snapshot_interval_s)
        # Asked at every assignment: a topic deleted and created again while this
        # handler ran is a new incarnation.
        tid = await topic_id(consumer, tp.topic)
        if tid != self.topic_id:
            self.topic_id = tid
            self.offset_metadata = offset_metadata(self.txn_id, tid)
        got = await self._committed(tp)
        log_end = (await consumer.end_offsets([tp]))[tp]
        verdict = judge_committed(got.offset, got.metadata, tid, log_end)
        if verdict.foreign:
            log.warning(
                "%s: ignoring the committed offset %s: %s (state of another incarnation of "
                "the topic); starting from the log start",
                tp,
                got.offset,
                verdict.foreign,
            )
        await w.restore(s.bootstrap, verdict.offset, tid, self._stop)
        self.workers[tp] = w
        # An immediate seek, never seek_to_beginning(): that one is applied lazily
        # and can rewind the position after a batch was already consumed. Offset 0
        # on a trimmed log falls back to the earliest offset via auto_offset_reset.
        consumer.seek(tp, verdict.offset or 0)

    async def _committed(self, tp: TopicPartition) -> Committed:
        """The partition's committed offset, once no open transaction holds a newer one.

        The previous owner commits its batch in flight before it gives a partition
        up, so the wait is normally one commit. An owner that was killed or frozen
        mid-transaction would hold it until the transaction timeout: every
        ``fence_after_s`` of waiting, the group's handlers that hold a transaction
        open outside the group are fenced, which aborts those transactions at once.
        """
        s = self.s
        assert self.consumer is not None
        if not s.eos:
            return await fetch_committed(self.consumer, s.group, tp, require_stable=False)
        t0 = time.monotonic()
        check_at = t0 + s.fence_after_s
        while True:
            if self._stop.is_set():
                # stop() waits for this callback; the partition's next owner reads the
                # offset instead.
                raise _Stopping(f"{tp}: stopped while its offset was unstable")
            try:
                return await fetch_committed(self.consumer, s.group, tp, require_stable=True)
            except Unstable:
                pass
            if time.monotonic() >= check_at:
                await self._fence_stale(tp, time.monotonic() - t0)
                check_at = time.monotonic() + s.fence_after_s
            await asyncio.sleep(0.02)

    async def _fence_stale(self, tp: TopicPartition, waited: float) -> None:
        assert self.consumer is not None
        # Partitions assigned together wait together: one lists and fences, and the
        # others' lists then show those transactions aborted.
        async with self._fence_lock:
            group = self.s.group
            try:
                stale = await stale_transactions(self.consumer, group, transactional_id(group, ""))
                for txn_id in sorted(stale - {self.txn_id}):
                    log.warning(
                        "%s: %s holds a transaction open outside the group after %.1fs; fencing it",
                        tp,
                        txn_id,
                        waited,
                    )
                    metrics.STALE_TXN_FENCED.inc()
                    await self._fence(txn_id)
            except KafkaError as e:  # e.g. a coordinator still loading: the next check
                log.warning("%s: cannot fence the open transactions (%r)", tp, e)

    async def _fence(self, txn_id: str) -> None:
        """Initialising a producer with ``txn_id`` aborts its open transaction and
        makes its current holder's next transactional request fail."""
        p = AIOKafkaProducer(bootstrap_servers=self.s.bootstrap, transactional_id=txn_id)
        await p.start()
        await p.stop()

    def _close_worker(self, tp: TopicPartition) -> None:
        self.workers.pop(tp, None)
        with contextlib.suppress(KeyError):
            metrics.PARTITION_LAG.remove(str(tp.partition))

    # Main loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until ``stop()``. Raises the error that made the handler give up, if
        one did, so the process exits non-zero and its supervisor replaces it.

        A batch still in flight a while after a stop request (a broker that does not
        answer) is abandoned: its transaction is aborted by ``stop()``, and its
        records are the next owner's to process."""
        self._run_task = asyncio.current_task()
        try:
            await self._poll()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._abandoned or task is None or task.uncancel() > 0:
                raise  # a cancellation that is not the stop's own
        finally:
            self._run_task = None
            if self._watchdog is not None:
                self._watchdog.cancel()

    async def _poll(self) -> None:
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
                    work = [
                        b
                        for tp, records in batches.items()
                        if records
                        and (w := self.workers.get(tp)) is not None
                        and (b := w.transform(records)) is not None
                    ]  # a missing worker was revoked while the fetch was in flight
                    if work:
                        await self._commit(work)
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

    async def _commit(self, work: list[Batch]) -> None:
        """Commit a poll's batches: one transaction with EOS, else output then offsets.

        A partition searched one record at a time for the record that keeps its
        commits failing (poison.py) commits alone, so that a failure is its own;
        the poll's batches then commit one after another.
        """
        groups = [[b] for b in work] if any(b.worker.one_at_a_time for b in work) else [work]
        for i, group in enumerate(groups):
            error = await self._commit_group(group)
            if error is not None:
                rest = [b for g in groups[i:] for b in g]
                await self._recover([b.worker.tp for b in rest], group, error)
                return
        self._failed_in_a_row = 0

    async def _commit_group(self, work: list[Batch]) -> Exception | None:
        """Commit batches together; the error if they could not be."""
        assert self.consumer is not None and self.producer is not None
        p = self.producer
        t0 = time.monotonic()
        try:
            if isinstance(p, FencedProducer):
                meta = GroupMetadata.of(self.consumer, self.s.group)
                await p.begin_transaction()
                futures = [f for b in work for f in await b.worker.send(p, b)]
                await p.send_offsets_fenced(
                    {
                        b.worker.tp: OffsetAndMetadata(b.next_offset, self.offset_metadata)
                        for b in work
                    },
                    meta,
                )
                # The commit waits for these anyway, but does not fail for every
                # refused produce: a record too large for its topic would commit
                # the offsets without it. Every outcome is read, so no refusal is
                # left for asyncio to report as never retrieved.
                for r in await asyncio.gather(*futures, return_exceptions=True):
                    if isinstance(r, BaseException):
                        raise r
                await p.commit_transaction()
            else:
                futures = [f for b in work for f in await b.worker.send(p, b)]
                await asyncio.gather(*futures)
        except Exception as e:  # any failure leaves state ahead of the commit
            metrics.TXN_ABORTS.labels(type(e).__name__).inc()
            log.warning(
                "batch of partitions %s at offsets %s failed (%r); aborting and restoring",
                sorted(b.worker.tp.partition for b in work),
                sorted(b.worker.committed for b in work),
                e,
            )
            return e
        done = time.time()
        for b in work:
            b.worker.committed_batch(b, done)
            self.messages += len(b.records)
            self._poison.committed(b.worker.tp, b.next_offset)
            if b.worker.one_at_a_time:
                # The poll's later records were dropped from the batch: fetch them again.
                self.consumer.seek(b.worker.tp, b.next_offset)
                b.worker.one_at_a_time = self._poison.one_at_a_time(b.worker.tp, b.next_offset)
                b.worker.condemned = self._poison.condemned(b.worker.tp)
                b.worker.bare = self._poison.bare(b.worker.tp)
        metrics.PROCESSING.observe(time.monotonic() - t0)
        if not isinstance(p, FencedProducer):
            # At-least-once: offsets after the output is acknowledged.
            try:
                await self.consumer.commit(
                    {b.worker.tp: (b.next_offset, self.offset_metadata) for b in work}
                )
            except KafkaError as e:
                log.warning("offset commit failed (%s); batch may repeat", e)
        return None

    async def _recover(
        self,
        tps: list[TopicPartition],
        failed: list[Batch] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Abort, then rebuild the partitions from their committed offsets.

        ``failed`` are the batches whose commit raised ``error``: repeated failures
        back off, and count towards finding a poison record (poison.py).
        """
        assert self.consumer is not None and self.producer is not None
        if failed:
            self._failed_in_a_row += 1
            n = self._failed_in_a_row
            await self._pause(0 if n <= 1 else min(self.s.retry_backoff_max_s, 0.25 * 2 ** (n - 2)))
        p = self.producer
        if isinstance(p, FencedProducer):
            # Not abort_transaction(): on an abortable error aiokafka forgets which
            # partitions the transaction wrote to, then "aborts" it without telling
            # the broker, and the next commit would commit the failed batch's output
            # too. A new producer's InitProducerId makes the broker abort whatever
            # it holds open for this transactional id; it also recovers a fenced one.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.stop(), 30)
            await self._retry("reopen the producer", self._open_producer)
            if self._fatal is not None:
                return
        for b in failed or ():
            # A lone record's failure is only its own if the error can be a record's
            # and the broker takes a commit without it: an outage must never
            # dead-letter good records.
            lone = b.worker.one_at_a_time and len(b.records) == 1
            if error is not None and (
                not lone or (may_be_the_records(error) and await self._probe([b.worker]))
            ):
                self._poison.failed(b.worker.tp, b.worker.committed, b.next_offset, error)
        for tp in tps:
            self._close_worker(tp)
            if tp in self.consumer.assignment():
                await self._retry(f"restore {tp}", functools.partial(self._open_worker, tp))
                w = self.workers.get(tp)
                if w is None:
                    continue
                w.one_at_a_time = self._poison.one_at_a_time(tp, w.committed)
                w.condemned = self._poison.condemned(tp)
                w.bare = self._poison.bare(tp)
                if w.one_at_a_time:
                    log.warning(
                        "%s keeps failing at offset %d: committing one record at a time%s",
                        tp,
                        w.committed,
                        f"; dead-lettering offsets {sorted(w.condemned)}" if w.condemned else "",
                    )

    async def _probe(self, workers: list[PartitionWorker]) -> bool:
        """Whether the broker takes a commit of the partitions' offsets as they stand."""
        assert self.consumer is not None and self.producer is not None
        p = self.producer
        try:
            if isinstance(p, FencedProducer):
                meta = GroupMetadata.of(self.consumer, self.s.group)
                await p.begin_transaction()
                await p.send_offsets_fenced(
                    {w.tp: OffsetAndMetadata(w.committed, self.offset_metadata) for w in workers},
                    meta,
                )
                await p.commit_transaction()
            else:
                await self.consumer.commit(
                    {w.tp: (w.committed, self.offset_metadata) for w in workers}
                )
            return True
        except Exception as e:
            log.warning("the broker refuses an empty commit too (%r): not the record's fault", e)
            if isinstance(p, FencedProducer):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(p.stop(), 30)
                await self._retry("reopen the producer", self._open_producer)
            return False

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless or until the handler is asked to stop."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), seconds)

    async def _retry(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        for attempt in range(30):
            try:
                await step()
                return
            except Exception as e:
                if self._stop.is_set():
                    log.info("stopping: gave up trying to %s (%r)", what, e)
                    return
                log.warning("cannot %s (%r), retry %d", what, e, attempt + 1)
                await self._pause(min(5.0, 0.2 * 2**attempt))
        self._fatal = RuntimeError(f"cannot {what}")
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
