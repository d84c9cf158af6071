"""The scaling decision: pure, deterministic, testable without a broker.

Three signals each propose a handler count and the largest wins:

* lag: enough handlers to keep up with the ingest rate *and* drain the current
  backlog within ``lag_target_s``;
* rate: the ingest rate plus headroom, so the count follows load before lag
  builds (capacity is learned from the handlers, not configured);
* session: a floor from the exchange calendar covering the whole ``lead_s``
  ahead, so handlers have joined before the burst: learned from earlier days'
  rates at the same time of the trading day (``scaler.floors``) when the
  policy has that history, else the calendar's per-session minimum.

A lag reading that failed, or that jumped further than the ingest rate could
have carried it since the last poll, holds the fleet for that poll: a broker
hiccup must not scale to the maximum.

Counts are converted to throughput partition-aware: with P partitions and n
handlers the busiest handler owns ceil(P/n) partitions, so the group sustains
only C * P / ceil(P/n) messages per second. 5 handlers on 12 partitions are no
faster than 4, so the policy never asks for 5.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from scaler.calendar import SessionCalendar
from scaler.floors import LearnedFloors
from scaler.signals import Snapshot

# Snapshot.extra key a measurer sets when the offsets could not be read.
LAG_ERROR = "lag_error"

SIGNALS = ("lag", "rate", "session")


@dataclass(frozen=True)
class PolicyConfig:
    min_handlers: int = 1
    max_handlers: int = 12
    lag_target_s: float = 5.0  # drain any backlog within this; also the lag SLO
    lag_floor_s: float = 1.0  # lag younger than this is in-flight work, not backlog
    headroom: float = 0.25  # rate signal provisions ingest * (1 + headroom)
    fallback_capacity: float = 1000.0  # msgs/s per handler until one is learned
    scale_down_window_s: float = 120.0  # a lower count must be proposed this long
    scale_down_fraction: float = 0.5  # at most this share of handlers removed per change
    scale_down_interval_s: float = 30.0  # minimum time from any change to a scale-down
    settle_s: float = 5.0  # minimum time between two changes
    rebalance_pause_s: float = 4.0  # measured stop-the-world pause per join/leave
    join_timeout_s: float = 60.0  # stop waiting for members to match the count after this
    lag_jump_slack: float = 4.0  # lag may grow by this many seconds of ingest per poll second

    def validate(self) -> None:
        if self.min_handlers < 0:
            raise ValueError("min_handlers must be >= 0")
        if self.max_handlers < 1:
            raise ValueError("max_handlers must be >= 1")
        if self.min_handlers > self.max_handlers:
            raise ValueError(
                f"min_handlers ({self.min_handlers}) > max_handlers ({self.max_handlers})"
            )
        if self.lag_target_s <= 0 or self.fallback_capacity <= 0:
            raise ValueError("lag_target_s and fallback_capacity must be > 0")
        if self.headroom < 0:
            raise ValueError("headroom must be >= 0")
        if not 0 < self.scale_down_fraction <= 1:
            raise ValueError("scale_down_fraction must be in (0, 1]")


@dataclass(frozen=True)
class Decision:
    """One poll's outcome, with everything needed to explain it afterwards."""

    time: float
    current: int
    desired: int  # the count to run now (== current when holding)
    target: int  # what the signals ask for, before stabilisation and step limits
    reason: str  # winning signal: lag | rate | session | min (or a baseline's name)
    action: str  # up | down | hold
    hold: str | None = None  # why a change was withheld: rebalancing | settling | ...
    proposals: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    explanation: str = ""

    @property
    def changes(self) -> bool:
        return self.desired != self.current

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": round(self.time, 3),
            "from": self.current,
            "to": self.desired,
            "target": self.target,
            "reason": self.reason,
            "action": self.action,
            "hold": self.hold,
            "proposals": self.proposals,
            "inputs": self.inputs,
            "explanation": self.explanation,
        }


def group_throughput(n: int, capacity: float, partitions: int) -> float:
    """Messages/s ``n`` handlers sustain when the busiest owns ceil(P/n) partitions."""
    if n <= 0:
        return 0.0
    if partitions <= 0:
        return n * capacity
    n = min(n, partitions)
    return capacity * partitions / math.ceil(partitions / n)


def handlers_for(throughput: float, capacity: float, partitions: int, limit: int) -> int:
    """Smallest count whose group throughput reaches ``throughput`` (``limit`` if none)."""
    if throughput <= 0:
        return 0
    for n in range(1, limit + 1):
        if group_throughput(n, capacity, partitions) >= throughput:
            return n
    return limit


class Policy:
    """Stateful only in what it must remember: recent targets and the last change."""

    name = "tickscale"
    poll_s = 1.0

    def __init__(
        self,
        cfg: PolicyConfig,
        calendar: SessionCalendar | None = None,
        floors: LearnedFloors | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.calendar = calendar
        self.floors = floors
        self._last_lag: tuple[float, int] | None = None
        self._targets: deque[tuple[float, int]] = deque()
        self._first: float | None = None
        self.last_change: float | None = None

    def proposals(self, snap: Snapshot, now: float) -> tuple[dict[str, int], dict[str, Any]]:
        cfg = self.cfg
        cap = snap.capacity if snap.capacity else cfg.fallback_capacity
        parts = snap.partition_count
        limit = max(cfg.max_handlers, parts, 1)
        rate = max(snap.ingest_rate, 0.0)
        backlog = snap.lag_msgs if snap.lag_s >= cfg.lag_floor_s else 0
        if (
            self.last_change is not None
            and now - self.last_change < cfg.rebalance_pause_s + cfg.lag_target_s
        ):
            # Our own last change stopped the group for about one rebalance pause;
            # that backlog drains by itself and must not trigger the next change
            # (the flapping a reactive scaler shows after every step).
            backlog = max(0, backlog - int(rate * cfg.rebalance_pause_s))
        lag_n = handlers_for(rate + backlog / cfg.lag_target_s, cap, parts, limit)
        if backlog == 0:
            lag_n = 0  # no backlog: keeping up is the rate signal's job
        rate_n = handlers_for(rate * (1 + cfg.headroom), cap, parts, limit)
        extra: dict[str, Any] = {"capacity_used": round(cap, 1), "backlog_msgs": backlog}
        session_n = self._session(snap, now, cap, limit, extra)
        return {"lag": lag_n, "rate": rate_n, "session": session_n}, extra

    def _session(
        self, snap: Snapshot, now: float, cap: float, limit: int, extra: dict[str, Any]
    ) -> int:
        if self.calendar is None or not snap.market_known:
            return 0
        when = now if snap.market_time is None else snap.market_time
        # Lead time is wall time (handlers take wall seconds to start and
        # join); on a replayed day that is lead * speed of market time.
        lead = self.calendar.lead_s * snap.market_speed
        if self.floors is not None:
            # Observed whether or not the history is ready: today is a later day's history.
            _, info = self.calendar.session(when)
            t = when - self.calendar.local_midnight(info.date)
            self.floors.observe(t, info, snap.ingest_rate)
            if self.floors.ready:
                rate = self.floors.rate_ahead(t, info, lead)
                extra["session_rate"] = round(rate, 1)
                if self.floors.trades_anyway(t, info):
                    extra["session"] = "closed-by-calendar-but-trading"
                extra["floor_scale"] = round(self.floors.scale(), 2)
                return handlers_for(
                    rate * (1 + self.cfg.headroom), cap, snap.partition_count, limit
                )
        fl = self.calendar.floor(when, lead)
        extra["session"] = fl.session.value
        extra["session_now"] = fl.now_session.value
        return fl.handlers

    def implausible(self, snap: Snapshot, now: float) -> str | None:
        """Why this poll's lag cannot be trusted (None if it can)."""
        if snap.extra.get(LAG_ERROR):
            return "lag-read-failed"
        last, self._last_lag = self._last_lag, (now, snap.lag_msgs)
        if last is None:
            return None
        dt = max(now - last[0], 1.0)
        grown = snap.lag_msgs - last[1]
        allowed = self.cfg.lag_jump_slack * max(snap.ingest_rate, 1.0) * dt + 1000
        return "lag-jump" if grown > allowed else None

    def bounds(self, snap: Snapshot) -> tuple[int, int]:
        upper = self.cfg.max_handlers
        if snap.partition_count > 0:
            # A handler beyond the partition count gets no partition: pure cost.
            upper = min(upper, snap.partition_count)
        return min(self.cfg.min_handlers, upper), upper

    def decide(self, snap: Snapshot, now: float, current: int) -> Decision:
        cfg = self.cfg
        distrust = self.implausible(snap, now)
        if distrust is not None:
            expl = f"lag unusable ({distrust}): holding {current}"
            return Decision(now, current, current, current, "lag", "hold", distrust, {},
                            snap.as_dict(), expl)  # fmt: skip
        props, extra = self.proposals(snap, now)
        raw = max(props.values())
        # Ties go to the signal listed first: lag explains more than rate, rate more
        # than the calendar.
        reason = next(s for s in SIGNALS if props[s] == raw)
        lo, hi = self.bounds(snap)
        target = min(max(raw, lo), hi)
        if target > raw:
            reason = "min"
        capped = " (capped)" if raw > hi else ""

        if self._first is None:
            self._first = now
        self._targets.append((now, target))
        while self._targets and self._targets[0][0] < now - cfg.scale_down_window_s:
            self._targets.popleft()

        desired, action, hold = self._step(snap, now, current, target, lo)
        if current > hi and hold is None:
            # Above the bound (max lowered, partitions shrank): correct at once.
            desired, action = hi, "down"

        inputs = snap.as_dict() | extra
        expl = (
            f"lag={snap.lag_msgs} msgs/{snap.lag_s:.1f}s rate={snap.ingest_rate:.0f}/s "
            f"cap={extra['capacity_used']:.0f}/s/handler ({snap.capacity_source}) "
            f"P={snap.partition_count} -> lag:{props['lag']} rate:{props['rate']} "
            f"session:{props['session']}; {reason} wins, target {target}{capped}; "
            f"{action} {current}->{desired}" + (f" (held: {hold})" if hold else "")
        )
        return Decision(now, current, desired, target, reason, action, hold, props, inputs, expl)

    def _step(
        self, snap: Snapshot, now: float, current: int, target: int, lo: int
    ) -> tuple[int, str, str | None]:
        """(desired, action, why held) on the way from ``current`` to ``target``: up at once,
        down only once the window's highest target allows it and the last change settled."""
        cfg = self.cfg
        desired, action, hold = current, "hold", None
        since = None if self.last_change is None else now - self.last_change
        if target != current:
            if snap.rebalancing:
                hold = "rebalancing"
            elif since is not None and since < cfg.settle_s:
                hold = "settling"
            elif (
                target < current
                and since is not None
                and since < cfg.join_timeout_s
                and snap.members != current
            ):
                # Handlers stopped or started by the last change have not all left or
                # joined yet; removing more now would stack a second rebalance on it.
                # Scale-up is never held this way: a crash-looping handler keeps the
                # members one short for good, and must not freeze the fleet's growth.
                hold = "joining"
            elif target > current:
                desired, action = target, "up"
            else:
                stable = max(t for _, t in self._targets)
                # decide() sets the window's start before it asks for a step.
                full = self._first is not None and now - self._first >= cfg.scale_down_window_s
                if stable >= current or not full:
                    hold = "stabilising"
                elif since is not None and since < cfg.scale_down_interval_s:
                    hold = "settling"
                else:
                    step = max(1, math.floor(current * cfg.scale_down_fraction))
                    desired = max(stable, current - step, lo)
                    action = "down" if desired < current else "hold"
        return desired, action, hold

    def applied(self, decision: Decision) -> None:
        """The backend made ``decision``'s change: start the settle/join clock."""
        if decision.changes:
            self.last_change = decision.time
