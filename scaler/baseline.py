"""The reactive baseline: KEDA's Kafka scaler feeding a Kubernetes HPA.

Modelled from KEDA's kafka scaler and the HPA controller as described in
NOTES.md, so the backtest compares against what people actually run:

* metric = total lag; a partition without a committed offset counts 1
  (offsetResetPolicy=latest) or its whole log-end offset (earliest); capped at
  partitions * lagThreshold unless allowIdleConsumers;
* desired = ceil(metric / lagThreshold) (AverageValue target), no change while
  the usage ratio is within 10% of 1;
* the HPA syncs every 15 s; scale-up at most max(100 %, 4 pods) per 15 s;
  scale-down takes the highest recommendation of the last 300 s, 100 % per 15 s;
* KEDA's own 30 s polling loop only drives activation (0 <-> 1 replicas);
  activation needs lag above ``activationLagThreshold``;
* optional cron triggers: a replica floor inside a weekly clock window (KEDA's
  cron scaler); the HPA takes the highest recommendation of all triggers. Cron
  knows the clock, not the exchange calendar: no holidays, no early closes.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from core.sessions import CLOSE, OPEN, Session
from scaler.policy import Decision
from scaler.signals import Snapshot


@dataclass(frozen=True)
class CronWindow:
    """A KEDA cron trigger: ``replicas`` from ``start_s`` to ``end_s`` (local clock) on weekdays."""

    start_s: int
    end_s: int
    replicas: int
    weekdays: tuple[int, ...] = (0, 1, 2, 3, 4)

    def active(self, local: dt.datetime) -> bool:
        t = local.hour * 3600 + local.minute * 60 + local.second
        return local.weekday() in self.weekdays and self.start_s <= t < self.end_s


def session_cron(floors: Mapping[Session, int], lead_s: float) -> tuple[CronWindow, ...]:
    """Cron triggers carrying the session floors of a normal day, raised ``lead_s`` early.

    What a KEDA user writes by hand: ``start: 28 9 * * 1-5``, ``end: 0 10 * * 1-5``,
    ``desiredReplicas: N`` for the open, the same for the close.
    """
    lead = int(lead_s)
    return (
        CronWindow(OPEN - lead, OPEN + 1800, floors.get(Session.OPEN, 0)),
        CronWindow(CLOSE - 1800 - lead, CLOSE, floors.get(Session.CLOSE, 0)),
    )


@dataclass(frozen=True)
class BaselineConfig:
    lag_threshold: float = 10.0  # KEDA's default lagThreshold
    activation_lag_threshold: float = 0.0
    min_replicas: int = 1
    max_replicas: int = 12
    sync_s: float = 15.0  # HPA --horizontal-pod-autoscaler-sync-period
    polling_s: float = 30.0  # KEDA pollingInterval (activation only)
    tolerance: float = 0.1
    up_pods: int = 4
    up_percent: float = 100.0
    down_window_s: float = 300.0
    down_percent: float = 100.0
    allow_idle_consumers: bool = False
    offset_reset: str = "latest"
    cron: tuple[CronWindow, ...] = ()
    tz: str = "America/New_York"  # the cron triggers' timezone


class ReactiveBaseline:
    """KEDA + HPA; ``poll_s`` tells a simulator it need not ask between HPA syncs."""

    def __init__(self, cfg: BaselineConfig, name: str = "reactive") -> None:
        if cfg.lag_threshold <= 0:
            raise ValueError("lag_threshold must be > 0")
        if cfg.min_replicas > cfg.max_replicas:
            raise ValueError("min_replicas > max_replicas")
        self.cfg = cfg
        self.name = name
        self.poll_s = cfg.sync_s
        self._tz = ZoneInfo(cfg.tz)
        self._next_sync: float | None = None
        self._next_poll: float | None = None
        self._recs: deque[tuple[float, int]] = deque()

    def metric(self, snap: Snapshot) -> float:
        """Total lag as KEDA's Kafka scaler reports it."""
        cfg = self.cfg
        if snap.partitions:
            total = 0
            for p in snap.partitions:
                if p.committed is None:
                    total += 1 if cfg.offset_reset == "latest" else p.end_offset
                else:
                    total += max(p.end_offset - p.committed, 0)
        else:
            total = snap.lag_msgs
        n_parts = snap.partition_count
        if not cfg.allow_idle_consumers and n_parts > 0:
            return float(min(total, n_parts * cfg.lag_threshold))
        return float(total)

    def cron_replicas(self, now: float) -> int:
        """The highest floor of the cron triggers active at ``now`` (0 if none)."""
        if not self.cfg.cron:
            return 0
        local = dt.datetime.fromtimestamp(now, tz=self._tz)
        return max((w.replicas for w in self.cfg.cron if w.active(local)), default=0)

    def _hold(self, snap: Snapshot, now: float, current: int, why: str) -> Decision:
        return Decision(now, current, current, current, "lag", "hold", why, {}, {}, why)

    def decide(self, snap: Snapshot, now: float, current: int) -> Decision:
        cfg = self.cfg
        if self._next_sync is None:
            self._next_sync = now
            self._next_poll = now
        metric = self.metric(snap)
        if current == 0:
            # Scaled to zero: only KEDA's polling loop can activate.
            assert self._next_poll is not None
            if now < self._next_poll:
                return self._hold(snap, now, current, "polling")
            self._next_poll = now + cfg.polling_s
            if metric > cfg.activation_lag_threshold:
                return self._decision(snap, now, current, 1, 1, metric)
            return self._hold(snap, now, current, "inactive")
        if now < self._next_sync:
            return self._hold(snap, now, current, "sync")
        self._next_sync = now + cfg.sync_s

        ratio = metric / current / cfg.lag_threshold
        if abs(ratio - 1.0) <= cfg.tolerance:
            rec = current
        else:
            rec = math.ceil(metric / cfg.lag_threshold)
        rec = max(rec, self.cron_replicas(now))  # the HPA takes the highest trigger
        # Deactivation to zero (KEDA cooldownPeriod) is not modelled: while
        # active the HPA never goes below one replica.
        rec = min(max(rec, cfg.min_replicas, 1), cfg.max_replicas)
        self._recs.append((now, rec))
        while self._recs and self._recs[0][0] < now - cfg.down_window_s:
            self._recs.popleft()

        desired = rec
        if rec < current:
            desired = max(r for _, r in self._recs)  # highest in the window wins
            floor = math.floor(current * (1 - cfg.down_percent / 100))
            desired = max(desired, floor)
            desired = min(desired, current)
        elif rec > current:
            limit = current + max(cfg.up_pods, math.ceil(current * cfg.up_percent / 100))
            desired = min(rec, limit)
        return self._decision(snap, now, current, desired, rec, metric)

    def _decision(
        self, snap: Snapshot, now: float, current: int, desired: int, rec: int, metric: float
    ) -> Decision:
        action = "up" if desired > current else "down" if desired < current else "hold"
        expl = (
            f"keda lag metric={metric:.0f} threshold={self.cfg.lag_threshold:.0f} -> "
            f"rec {rec}; {action} {current}->{desired}"
        )
        return Decision(
            now,
            current,
            desired,
            rec,
            "lag",
            action,
            None,
            {"lag": rec},
            {"metric": metric, **snap.as_dict()},
            expl,
        )

    def applied(self, decision: Decision) -> None:
        """The HPA has no cool-down of its own beyond its sync period."""
