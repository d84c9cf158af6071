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

The parts, one concern each: probes.py (health and readiness), grace.py (the
stop's deadline), fetch.py (the group consumer and the poll's top-up),
restore.py (taking a partition on), commits.py (the producer and what it
commits), recovery.py (a failed commit and the poison record behind it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError

from core.aiokafka_internals import stop_consumer
from core.client_log import CLIENT_REPEATS, MISSING_TOPICS
from core.constants import LEAVE_KEY_FIELD, LEAVE_SIGNAL, LEAVE_SIGNAL_FIELD
from core.retry import retry_async
from core.runtime import stop_on_signals
from core.secrets import client_secrets
from ingest import metrics
from ingest.handler.commits import Committer
from ingest.handler.fetch import (
    Batches,
    group_consumer,
    move_into_log,
    out_partitions,
    top_up,
)
from ingest.handler.grace import StopGrace
from ingest.handler.group_exit import Replacement
from ingest.handler.partition import Outputs, PartitionWorker
from ingest.handler.probes import Probes
from ingest.handler.recovery import Recovery
from ingest.handler.redis_sink import RedisSink
from ingest.handler.restore import Restorer, fence, transactional_id
from ingest.handler.retry_log import PRODUCE_RETRIES
from ingest.handler.settings import HandlerSettings
from ingest.handler.work_meter import WorkMeter

log = logging.getLogger(__name__)

__all__ = ["FeedHandler", "transactional_id"]

# "You are being replaced" (a rollout step): sent by the scaler before it starts the
# replacement (group_exit.Replacement).
REPLACED_SIGNAL = signal.Signals[LEAVE_SIGNAL]


class _Listener(ConsumerRebalanceListener):
    def __init__(self, handler: FeedHandler) -> None:
        self.h = handler

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.h._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.h._on_assigned(assigned)


def _announcing_sink(s: HandlerSettings, url: str, on_leave: Callable[[], None]) -> RedisSink:
    # The scaler announces a replacement (by signal, or by Redis where it cannot
    # signal one handler) only to a handler that says it understands.
    return RedisSink(
        client_secrets().redis_url(url),
        s.handler_id,
        static={LEAVE_SIGNAL_FIELD: REPLACED_SIGNAL.name, LEAVE_KEY_FIELD: "1"},
        on_leave=on_leave,
    )


class FeedHandler:
    """One feed-handler process. Use ``async with FeedHandler(s) as h: await h.run()``.

    It owns the consumer, the partitions' workers and the consume loop; its
    parts own the rest: ``probes`` the health endpoint, ``grace`` the stop's
    deadline, ``restorer`` taking partitions on, ``committer`` the producer and
    what it commits.
    """

    def __init__(self, settings: HandlerSettings) -> None:
        self.s = settings
        self.workers: dict[TopicPartition, PartitionWorker] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.sink: RedisSink | None = None
        self.txn_id = transactional_id(settings.group, settings.handler_id)
        self.probes = Probes(settings)
        self.grace = StopGrace(settings.stop_grace_s, settings.handler_id)
        self.restorer: Restorer | None = None  # once the output topic is known
        self.committer = Committer(settings, self.txn_id, self._offset_metadata)
        self._lock = asyncio.Lock()  # a poll's commit, a rebalance and a stop take turns
        self.meter = WorkMeter()  # for the scaler's capacity model
        self.rebalances = 0  # revocations seen; a poll across one holds stale records
        self.replacement = Replacement()  # SIGUSR1: leave at the next rebalance
        self.recovery = Recovery(self, settings.poison_after)

    async def __aenter__(self) -> FeedHandler:
        try:
            await self.start()
        except BaseException:
            await self.stop()  # what did start (probes' port, Redis, producer) is closed
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _offset_metadata(self) -> str:
        return self.restorer.offset_metadata if self.restorer is not None else self.txn_id

    # Lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.s
        PRODUCE_RETRIES.install()  # once per process; adding the same filter again is a no-op
        MISSING_TOPICS.install()
        metrics.INFO.labels(s.version or "unversioned").set(1)
        await self.probes.start()
        if s.redis_url:
            self.sink = _announcing_sink(s, s.redis_url, self.replacement.announce)
            await self.sink.start()
        outputs = Outputs(s.out_topic, await out_partitions(s), s.deadletter_topic)
        self.restorer = Restorer(s, outputs, self.sink, self.grace.event)
        await self.committer.open()
        self.consumer = group_consumer(s)
        self.consumer.subscribe([s.in_topic], listener=_Listener(self))
        await self.consumer.start()
        self.probes.started = True

    def request_stop(self) -> None:
        """Start stopping: the handler is closed ``stop_grace_s`` from now at the latest."""
        self.grace.request()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        stop_on_signals(loop, self.request_stop)
        loop.add_signal_handler(REPLACED_SIGNAL, self.replacement.announce)

    async def stop(self) -> None:
        """Commit or abort what is held, save snapshots, leave the group, close: each
        step within what is left of ``stop_grace_s``, skipped once it has run out."""
        g = self.grace
        g.request()  # (the watchdog stays armed while run() is still busy)
        try:
            # Half the grace at most: the rest is for leaving the group and closing.
            async with asyncio.timeout(max(0.1, g.left() - 0.5 * g.grace_s)):
                async with self._lock:  # the batch in flight commits first
                    if not g.abandoned:
                        # (An abandoned batch left the state ahead of the commit.)
                        for w in self.workers.values():
                            w.save_snapshot()
        except TimeoutError:
            # A restore or a commit still holds the lock: the state is not at a
            # committed offset, so no snapshot.
            log.warning("stop: the partitions are still busy; no snapshots saved")
        if self.sink is not None:
            # Before leaving: the next owners restore from these.
            await g.bounded("flush Redis", self.sink.flush())
        if self.consumer is not None:
            # Leaves the group; the revoke callback closes the partition producers.
            stopping = asyncio.ensure_future(stop_consumer(self.consumer))
            await asyncio.sleep(0)  # consumer.stop() marks the coordinator closing at once
            self.replacement.consumer_closing.set()  # a replaced handler's callback may return
            await g.bounded("leave the group", stopping, KafkaError)
            self.consumer = None
        for tp in list(self.workers):
            self.close_worker(tp)
        p, open_txn = self.committer.detach()
        if p is not None:
            await g.bounded("close the producer", p.stop(), KafkaError, AssertionError)
            if open_txn:
                # Aborts it now rather than when it times out, which would hold the
                # partitions' next owners back until then.
                await g.bounded(
                    "abort the open transaction", fence(self.s.bootstrap, self.txn_id), KafkaError
                )
        if self.sink is not None:
            await g.bounded("close Redis", self.sink.stop())
            self.sink = None
        await self.probes.stop()
        log.info("handler %s stopped after %d messages", self.s.handler_id, self.meter.messages)

    # Rebalance callbacks --------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self.rebalances += 1
        async with self._lock:
            for tp in revoked:
                w = self.workers.get(tp)
                if w is not None:
                    w.save_snapshot()
                self.close_worker(tp)
            if self.sink is not None:
                # Written before this member rejoins, so the partitions' next owners
                # restore from the committed offset itself instead of replaying from
                # an older snapshot.
                await self.sink.flush()
        metrics.ASSIGNED.set(len(self.workers))
        if self.replacement.due() and self.consumer is not None:
            await self.replacement.leave(self.consumer, self.request_stop)

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        metrics.REBALANCES.inc()
        async with self._lock:
            # A partition left without a worker would stall unseen until the next
            # rebalance: a restore that keeps failing fails the handler instead.
            await asyncio.gather(
                *(
                    self.retry(f"restore {tp}", functools.partial(self.open_worker, tp))
                    for tp in assigned
                    if tp not in self.workers
                )
            )
        metrics.ASSIGNED.set(len(self.workers))
        if self.grace.requested:
            return  # the restores gave up (logged): nothing was taken on
        self.probes.joined = True
        log.info("assigned %s", sorted(tp.partition for tp in assigned))

    async def open_worker(self, tp: TopicPartition) -> None:
        consumer = self.consumer
        assert consumer is not None and self.restorer is not None
        w = await self.restorer.open(consumer, tp)
        self.workers[tp] = w
        # An immediate seek, never seek_to_beginning(): that one is applied lazily
        # and can rewind the position after a batch was already consumed. With nothing
        # committed the start is wherever the log starts now; a committed offset whose
        # records have been deleted since is left to the poll to say (move_into_log).
        start = w.committed or (await consumer.beginning_offsets([tp]))[tp]
        consumer.seek(tp, start)

    def close_worker(self, tp: TopicPartition) -> None:
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
        self.grace.run_task = asyncio.current_task()
        try:
            await self._poll()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self.grace.abandoned or task is None or task.uncancel() > 0:
                raise  # a cancellation that is not the stop's own
        finally:
            self.grace.loop_ended()

    async def _poll(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        last_stats = 0.0
        while not self.grace.requested:
            if self.recovery.holding:
                await self.recovery.hold(consumer)
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=self.s.max_batch)
            except OffsetOutOfRangeError as e:
                async with self._lock:  # not beside an assignment's own seek
                    positions: dict[TopicPartition, int] = e.args[0]
                    await move_into_log(
                        consumer, {tp: p for tp, p in positions.items() if tp in self.workers}
                    )
                continue
            except NoOffsetForPartitionError:
                # The fetcher's own first look, made before the assignment's restore
                # sought the partition's start: that seek has replaced it.
                continue
            except KafkaError as e:
                log.warning("fetch failed: %s", e)
                await asyncio.sleep(0.5)
                continue
            if batches and self.s.fetch_topup_ms:
                batches = await self._top_up(consumer, batches)
            if batches:
                async with self._lock, self.meter.batch():
                    work = [
                        b
                        for tp, records in batches.items()
                        if records
                        and (w := self.workers.get(tp)) is not None
                        and (b := w.transform(records)) is not None
                    ]  # a missing worker was revoked while the fetch was in flight
                    if work:
                        await self.recovery.commit(work)
            now = time.monotonic()
            if now - last_stats >= 1.0:
                last_stats = now
                self._report(consumer)
                CLIENT_REPEATS.flush()  # an outage's client errors: how many, once over
                self._check_parent()
        if self.probes.fatal is not None:
            raise self.probes.fatal

    async def _top_up(self, consumer: AIOKafkaConsumer, batches: Batches) -> Batches:
        return await top_up(
            consumer, batches, self.s.max_batch, self.s.fetch_topup_ms, lambda: self.rebalances
        )

    async def retry(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await retry_async(
                step, what=what, attempts=30, first_s=0.2, max_s=5.0,
                retry_on=lambda e: isinstance(e, Exception) and not self.grace.requested,
                sleep=self.grace.pause, log=log,
            )  # fmt: skip
        except Exception as e:
            if self.grace.requested:
                log.info("stopping: gave up trying to %s (%r)", what, e)
                return
            self.probes.fatal = RuntimeError(f"cannot {what}")
            self.grace.event.set()

    def _check_parent(self) -> None:
        """An orphan would keep consuming outside any fleet its owner's successor sees,
        which could then neither count it nor stop it."""
        pid = self.s.parent_pid
        if pid is not None and os.getppid() != pid and not self.grace.requested:
            log.warning("parent process %d is gone; draining and leaving the group", pid)
            self.request_stop()

    def _report(self, consumer: AIOKafkaConsumer) -> None:
        for tp, w in self.workers.items():
            hw = consumer.highwater(tp)
            if hw is not None:
                metrics.PARTITION_LAG.labels(str(tp.partition)).set(max(0, hw - w.committed))
        if self.sink is not None:
            m = self.meter
            self.sink.stats(m.messages, m.busy_s, m.cpu_s, m.batches, self.s.max_batch)
