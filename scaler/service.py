"""The scaler process: measure, decide, act, every poll, while holding the lease.

One decision's path, top to bottom: ``LagProbe.measure`` (offsets and group
state from the broker) -> ``RedisCapacity.poll`` (per-handler capacity the
handlers report) -> the market clock (which session it is) -> the policy ->
the backend -> the audit trail and metrics. A follower (no lease) measures
and decides too, so its metrics and its take-over are warm, but never acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from typing import Any, Protocol

from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.http import HealthServer
from core.repeats import RepeatedFailure
from core.runtime import stop_on_signals
from core.sessions import Session
from scaler import metrics as m
from scaler.action_backoff import ActionBackoff
from scaler.audit import AuditLog
from scaler.backends.base import Backend, BackendError, HandlerInstance
from scaler.capacity import RedisCapacity
from scaler.clock import MarketClock
from scaler.lag import LagProbe
from scaler.lease import LeaderLease
from scaler.policy import Decision
from scaler.rate_history import RateHistory
from scaler.rollout import RolloutController
from scaler.signals import Snapshot

log = logging.getLogger("scaler")


class Decider(Protocol):
    name: str

    def decide(self, snap: Snapshot, now: float, current: int) -> Decision: ...

    def applied(self, decision: Decision) -> None: ...


@dataclass(frozen=True)
class ScalerParts:
    """What a scaler is assembled from (see ``scaler.app.build``); it owns their lifecycle."""

    backend: Backend
    decider: Decider
    probe: LagProbe
    redis: Redis
    lease: LeaderLease
    audit: AuditLog
    capacity: RedisCapacity
    clock: MarketClock


class Scaler:
    """Owns its probe, lease, backend and HTTP server; ``async with`` starts and stops them.

    :param poll_s: time between the starts of two polls.
    :param dry_run: decide and log, change nothing.

    ``stale_s``: past this long without a good poll, its figures are old; the scaler is
    not ready (/readyz) and its KEDA service answers UNAVAILABLE.
    """

    def __init__(
        self,
        scaler_id: str,
        parts: ScalerParts,
        *,
        poll_s: float = 1.0,
        dry_run: bool = False,
        http: HealthServer | None = None,
        stop_handlers_on_exit: bool = False,
    ) -> None:
        self.scaler_id = scaler_id
        self.backend = parts.backend
        self.decider = parts.decider
        self.probe = parts.probe
        self.redis = parts.redis
        self.lease = parts.lease
        self.audit = parts.audit
        self.capacity = parts.capacity
        self.clock = parts.clock
        self.poll_s = poll_s
        self.stale_s = max(10.0, 5 * poll_s)
        self.dry_run = dry_run
        self.http = http
        self.stop_handlers_on_exit = stop_handlers_on_exit
        self.rollout: RolloutController | None = None  # set by the assembler (scaler.app)
        # Keeps the learned floors' observations for later days (set by the assembler).
        self.rates: RateHistory | None = None
        self.last: Decision | None = None
        self.snapshot: Snapshot | None = None  # the last poll's measurement
        self._stop = asyncio.Event()
        self._started = False
        self._measured_at: float | None = None  # monotonic time of the last good poll
        self._failing = RepeatedFailure(log, "poll")
        self._backoff = ActionBackoff(log)
        self._last_logged: tuple[int, int] | None = None

    async def start(self) -> None:
        # The metrics port first: a port that cannot be had (a second scaler on this
        # machine) fails the start before a lease is taken or a handler adopted.
        if self.http is not None:
            await self.http.start()
        # The backend may wait for its engine (up to --connect-timeout): a stop asked for
        # meanwhile ends that wait, and the scaler with it, rather than outlive it.
        if not await self._unless_stopped(self.backend.start()):
            log.info("scaler %s: stopped while starting its backend", self.scaler_id)
            return
        if self.rollout is not None:
            await self.rollout.start()
        await self.probe.start()
        await self.lease.start()
        m.DRY_RUN.set(1 if self.dry_run else 0)
        m.init_series()
        self._started = True
        log.info(
            "scaler %s: backend %s, policy %s%s", self.scaler_id, self.backend.name,
            self.decider.name, " (dry run)" if self.dry_run else "",
        )  # fmt: skip

    async def _unless_stopped(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run ``work`` to its end (True), or cancel it when a stop is asked for first."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            stopping.cancel()
        if task.done():
            task.result()  # its error, if any, is the start's
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False

    async def stop(self) -> None:
        self._stop.set()
        if self.stop_handlers_on_exit and self.lease.is_leader and not self.dry_run:
            try:
                n = len(await self.backend.list())
                removed = await self.backend.remove(n)
                await self.backend.retire()
                log.info("stopped %d handlers on exit", len(removed))
            except BackendError as e:
                log.warning("could not stop the handlers on exit: %s", e)
        # Lease first: a follower takes over while this one closes its connections.
        with contextlib.suppress(Exception):
            await self.lease.stop()
        m.LEADER.set(0)
        for closer in (self.probe.stop, self.backend.close):
            try:
                await closer()
            except Exception as e:  # shutting down: report and keep closing the rest
                log.warning("closing %s failed: %s", closer, e)
        if self.http is not None:
            await self.http.stop()
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()

    async def __aenter__(self) -> Scaler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        stop_on_signals(asyncio.get_running_loop(), self.request_stop)

    def healthy(self) -> bool:
        return self._started and not self._stop.is_set()

    def ready(self) -> bool:
        t = self._measured_at
        return self._started and t is not None and time.monotonic() - t <= self.stale_s

    async def run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                await self.poll_once()
            except (KafkaError, OSError, RedisError, BackendError) as e:
                # One bad poll (broker election, Docker hiccup) must not end the
                # scaler; the next poll measures afresh. While they keep failing (the raw
                # topic deleted, Redis down) the fleet is held and it is said once a minute.
                m.POLL_FAILURES.inc()
                self._failing.failed(e)
            else:
                self._failing.succeeded()
            m.POLL.observe(time.monotonic() - t0)
            delay = max(0.0, self.poll_s - (time.monotonic() - t0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)

    async def measure(self) -> Snapshot:
        snap = await self.probe.measure()
        cap, source = await self.capacity.poll()
        snap = snap.with_capacity(cap, source)
        mt = await self.clock.now()
        if mt is None:
            snap = replace(snap, market_known=False)
        else:
            snap = replace(snap, market_time=mt.when, market_speed=mt.speed)
        self._measured_at = time.monotonic()
        m.LAST_GOOD_POLL.set(snap.time)
        return snap

    async def poll_once(self) -> Decision:
        snap = await self.measure()
        self.snapshot = snap
        try:
            instances = await self.backend.list()
        except BackendError:
            m.BACKEND_ERRORS.labels("list").inc()
            raise
        current = len(instances)
        now = time.time()
        d = self.decider.decide(snap, now, current)
        self.last = d
        self._export(snap, d, current)
        leader = self.lease.is_leader
        m.LEADER.set(1 if leader else 0)
        if self.rates is not None:
            if leader and not self.dry_run:
                await self.rates.flush()
            else:
                self.rates.floors.take_today()  # only the leader's day is kept
        if self.rollout is not None and leader and not self.dry_run:
            market = snap.market_time if snap.market_known and snap.market_time else now
            if await self.rollout.step(instances, market):
                return d  # the fleet changed under the decision: decide again next poll
        if not d.changes:
            return d
        if not leader:
            return d
        if self.dry_run:
            key = (d.current, d.desired)
            if key != self._last_logged:
                self._last_logged = key
                log.info("dry run: would scale %d->%d: %s", d.current, d.desired, d.explanation)
            return d
        if self._backoff.holds("add" if d.desired > d.current else "remove"):
            return d  # failed a moment ago: tried again once its backoff has passed
        result = await self._apply(d, instances)
        self.decider.applied(d)
        direction = "up" if d.desired > d.current else "down"
        m.SCALE_EVENTS.labels(d.reason, direction).inc()
        await self.audit.record(d, self.scaler_id, self.backend.name, result)
        return d

    async def _apply(self, d: Decision, instances: list[HandlerInstance]) -> dict[str, Any]:
        op = "add" if d.desired > d.current else "remove"
        n = abs(d.desired - d.current)
        try:
            if op == "add":
                ids = await self.backend.add(n)
            elif self.rollout is not None and self.rollout.active:
                # Mid-rollout, scale-in spares the canary (see RolloutController.victims).
                ids = await self.backend.remove_ids(self.rollout.victims(instances, n))
            else:
                ids = await self.backend.remove(n)
        except BackendError as e:
            m.BACKEND_ERRORS.labels(op).inc()
            wait = self._backoff.failed(op, n, e)
            return {"op": op, "n": n, "ok": False, "error": str(e), "retry_in_s": round(wait, 1)}
        self._backoff.succeeded()
        return {"op": op, "n": n, "ok": True, "ids": ids}

    def _export(self, snap: Snapshot, d: Decision, current: int) -> None:
        m.DESIRED.set(d.desired)
        m.TARGET.set(d.target)
        m.RUNNING.set(current)
        m.MEMBERS.set(snap.members)
        m.LAG_MSGS.set(snap.lag_msgs)
        m.LAG_SECONDS.set(snap.lag_s)
        m.INGEST_RATE.set(snap.ingest_rate)
        m.PROCESS_RATE.set(snap.process_rate)
        m.PARTITIONS.set(snap.partition_count)
        if snap.capacity is not None:
            m.CAPACITY.set(snap.capacity)
        for p in snap.partitions:
            m.PARTITION_LAG.labels(str(p.partition)).set(p.lag)
        for sig, n in d.proposals.items():
            m.PROPOSAL.labels(sig).set(n)
        now_session = d.inputs.get("session_now", Session.CLOSED.value)
        for s in Session:
            m.SESSION.labels(s.value).set(1 if s.value == now_session else 0)
        m.DECISIONS.labels(d.reason, d.action).inc()
