"""One day, one second at a time, through a decider and a model of the handler fleet.

What the model charges for, because live Kafka does:

* in-flight lag: a handler polls, processes and commits in cycles of
  ``commit_cycle_s``, so the committed offset trails the log end by a cycle's
  records even when the fleet keeps up; lag is never 0 under load;
* start-up and rebalance pauses drawn per event from the ranges the
  benchmarks measured for the backend (``scaler.sim.pauses``);
* handler capacity varies: each handler's ceiling is drawn around the model's
  figure, and a slow common drift (a busier host) moves them all; the group is
  as fast as its slowest busiest member allows.

Policies are compared on common random numbers: the day's capacity draws
belong to slots (a handler takes the lowest free slot, as a container takes a
free core), and the drift and the pauses have their own streams. So at one
seed every policy meets the same host and the same handlers for the same
fleet size, and a difference between two policies is their decisions', not
their luck with the draws (before, one extra start reshuffled every later
draw, and a fixed fleet could lag more than a smaller scaled one).

The decider sees only what it could observe live: end and committed offsets
(lag in messages and seconds, ingest and process rates), members, the group's
state, and a capacity it must estimate itself from saturated throughput
(``scaler.capacity.SaturationCapacity``), starting from a configured figure
that may be wrong by ``capacity_error``.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from scaler.capacity import SaturationCapacity
from scaler.policy import Decision
from scaler.signals import Ewma, Snapshot
from scaler.sim.pauses import Pauses, pauses_for


class Decider(Protocol):
    name: str

    def decide(self, snap: Snapshot, now: float, current: int) -> Decision: ...

    def applied(self, decision: Decision) -> None: ...


@dataclass(frozen=True)
class HandlerModel:
    capacity: float = 2500.0  # msgs/s one handler sustains, on average
    partitions: int = 12
    backend: str = "docker"  # whose measured pauses apply (scaler.sim.pauses)
    initial: int = 1  # handlers running when the day starts
    commit_cycle_s: float = 0.1  # poll -> process -> commit: records in flight
    capacity_noise: float = 0.15  # per-handler lognormal spread of the ceiling
    capacity_error: float = 0.0  # the policy's configured capacity is off by this share
    seed: int = 0

    @property
    def pauses(self) -> Pauses:
        return pauses_for(self.backend)


@dataclass
class SimResult:
    name: str
    handler_seconds: float = 0.0
    lag_above_target_s: int = 0
    peak_lag_s: float = 0.0
    peak_lag_msgs: float = 0.0
    scale_events: int = 0
    max_handlers: int = 0
    unprocessed_at_end: float = 0.0
    times: list[int] = field(default_factory=list)
    handlers: list[int] = field(default_factory=list)
    lag_s: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "handler_seconds": round(self.handler_seconds, 1),
            "lag_above_target_s": self.lag_above_target_s,
            "peak_lag_s": round(self.peak_lag_s, 1),
            "peak_lag_msgs": round(self.peak_lag_msgs),
            "scale_events": self.scale_events,
            "max_handlers": self.max_handlers,
            "scale_events_by_reason": dict(sorted(self.reasons.items())),
        }


@dataclass
class _Handler:
    ready_at: float
    capacity: float
    slot: int
    leaving_at: float | None = None


def group_capacity(caps: list[float], partitions: int) -> float:
    """Messages/s of a group whose members (in join order) own a range assignment each:
    the first ``P mod n`` own one partition more; the slowest per-partition rate rules."""
    n = min(len(caps), partitions)
    if n == 0:
        return 0.0
    base, extra = divmod(partitions, n)
    per_part = min(c / (base + (1 if i < extra else 0)) for i, c in enumerate(caps[:n]))
    return per_part * partitions


class _Fleet:
    """Handlers started, joined and leaving, and the group's pause state."""

    def __init__(self, model: HandlerModel, rng: random.Random, slot_caps: list[float]) -> None:
        self.model = model
        self.rng = rng  # pauses only
        self.slot_caps = slot_caps
        self.handlers: list[_Handler] = []
        for _ in range(model.initial):
            self.handlers.append(self._new(-math.inf))
        self.members: list[_Handler] = list(self.handlers)
        self.pause_until = -math.inf
        self.capacity = group_capacity([h.capacity for h in self.members], model.partitions)

    def _new(self, ready_at: float) -> _Handler:
        taken = {h.slot for h in self.handlers}
        slot = next(i for i in range(len(taken) + 1) if i not in taken)
        # Slots beyond the partitions' own no partition; they reuse the draws in turn.
        while slot >= len(self.slot_caps):
            self.slot_caps.append(self.slot_caps[slot % len(self.slot_caps)])
        return _Handler(ready_at, self.slot_caps[slot], slot)

    def step_membership(self, t: float) -> None:
        self.handlers = [h for h in self.handlers if h.leaving_at is None or h.leaving_at > t]
        joined = [h for h in self.handlers if h.ready_at <= t and h.leaving_at is None]
        if len(joined) != len(self.members) or any(
            a is not b for a, b in zip(joined, self.members, strict=False)
        ):
            self.members = joined
            self.pause_until = max(self.pause_until, t) + self.model.pauses.rebalance(self.rng)
            self.capacity = group_capacity([h.capacity for h in joined], self.model.partitions)

    def apply(self, desired: int, t: float) -> None:
        live = [h for h in self.handlers if h.leaving_at is None]
        if desired > len(live):
            for _ in range(desired - len(live)):
                self.handlers.append(self._new(t + self.model.pauses.startup(self.rng)))
        elif desired < len(live):
            # Remove the youngest first: a handler still starting costs no rebalance.
            for h in sorted(live, key=lambda h: -h.ready_at)[: len(live) - desired]:
                h.leaving_at = t + 1 if h.ready_at <= t else t

    def running_fraction(self, t: float) -> float:
        """Share of second [t, t+1) the group was not stopped by a rebalance."""
        return min(1.0, max(0.0, t + 1 - self.pause_until))

    @property
    def live(self) -> int:
        return sum(1 for h in self.handlers if h.leaving_at is None)


def _queue_age(arrived_cum: list[float], processed: float, i: int) -> float:
    """Age in seconds of the oldest record not yet processed at the end of second ``i``."""
    k = bisect.bisect_right(arrived_cum, processed)
    if k > i:
        return 0.0
    prev = arrived_cum[k - 1] if k > 0 else 0.0
    frac = (processed - prev) / max(arrived_cum[k] - prev, 1e-9)
    return max(0.0, i - (k + frac) + 1)


@dataclass
class _Observer:
    """What a live scaler could measure: offsets, rates, members, its own capacity estimate."""

    model: HandlerModel
    ingest: Ewma = field(default_factory=lambda: Ewma(5.0))
    process: Ewma = field(default_factory=lambda: Ewma(5.0))
    cap: SaturationCapacity | None = None

    def __post_init__(self) -> None:
        self.cap = SaturationCapacity(self.model.capacity * (1 + self.model.capacity_error))

    def observe(self, rate: float, done: float, backlog: float, age: float, fleet: _Fleet,
                stable: bool) -> None:  # fmt: skip
        """One second's measurements (rates and the capacity estimate follow every second)."""
        assert self.cap is not None
        self.ingest.update(rate, 1.0)
        self.process.update(done, 1.0)
        # Saturated: a backlog older than a second waited while the whole group ran.
        saturated = stable and age > 1.0 and backlog > 0
        self.cap.observe(done, len(fleet.members), self.model.partitions, saturated, 1.0)

    def lag(self, done: float, backlog: float, age: float) -> tuple[float, float]:
        """(messages, seconds) between the log end and the committed offsets."""
        cycle = self.model.commit_cycle_s
        return backlog + done * cycle, age + (cycle if done > 0 or backlog > 0 else 0.0)

    def snapshot(
        self, now: float, lag: tuple[float, float], fleet: _Fleet, stable: bool
    ) -> Snapshot:
        assert self.cap is not None
        return Snapshot(
            time=now,
            lag_msgs=int(lag[0]),
            lag_s=lag[1],
            ingest_rate=self.ingest.value or 0.0,
            process_rate=self.process.value or 0.0,
            members=len(fleet.members),
            partitions_hint=self.model.partitions,
            group_state="Stable" if stable else "PreparingRebalance",
            capacity=self.cap.value,
            capacity_source=self.cap.source,
        )


def run(
    rates: list[float],
    start_s: int,
    decider: Decider,
    model: HandlerModel,
    lag_target_s: float,
    midnight: float,
    keep_series: bool = False,
) -> SimResult:
    """Step ``rates`` (msgs/s per second from ``start_s``) through ``decider`` and the model.

    :param midnight: unix time of the day's local midnight (the calendar needs real time).
    """
    res = SimResult(decider.name)
    base = model.seed * 7919
    draw = random.Random(base + 31)
    caps = [
        model.capacity * draw.lognormvariate(0.0, model.capacity_noise)
        for _ in range(max(model.partitions, model.initial, 1))
    ]
    fleet = _Fleet(model, random.Random(base + 17), caps)
    host = random.Random(base + 29)  # the drift's own stream: the same host for every policy
    obs = _Observer(model)
    poll = float(getattr(decider, "poll_s", 1.0))
    arrived_cum: list[float] = []
    arrived = processed = drift = 0.0
    next_poll = -math.inf
    for i, rate in enumerate(rates):
        t = start_s + i
        arrived += rate
        arrived_cum.append(arrived)
        fleet.step_membership(t)
        drift = 0.995 * drift + 0.005 * host.gauss(0.0, 1.0)  # a host slowly busier or freer
        running = fleet.running_fraction(t)
        done = min(arrived - processed, fleet.capacity * (1 + drift) * running)
        processed += done
        backlog = arrived - processed
        age = _queue_age(arrived_cum, processed, i) if backlog > 1e-6 else 0.0
        stable = running >= 1.0
        obs.observe(rate, done, backlog, age, fleet, stable)
        lag_msgs, lag_s = obs.lag(done, backlog, age)
        if t >= next_poll:
            next_poll = t + poll
            snap = obs.snapshot(midnight + t, (lag_msgs, lag_s), fleet, stable)
            _decide(decider, snap, fleet, res, t)
        n_cost = len(fleet.handlers)  # starting and draining handlers cost too
        res.handler_seconds += n_cost
        res.max_handlers = max(res.max_handlers, n_cost)
        res.lag_above_target_s += lag_s > lag_target_s
        res.peak_lag_s = max(res.peak_lag_s, lag_s)
        res.peak_lag_msgs = max(res.peak_lag_msgs, lag_msgs)
        if keep_series:
            res.times.append(t)
            res.handlers.append(n_cost)
            res.lag_s.append(lag_s)
    res.unprocessed_at_end = arrived - processed
    return res


def _decide(decider: Decider, snap: Snapshot, fleet: _Fleet, res: SimResult, t: int) -> None:
    current = fleet.live
    d = decider.decide(snap, snap.time, current)
    if d.desired != current:
        fleet.apply(d.desired, t)
    if d.changes:
        decider.applied(d)
        res.scale_events += 1
        res.reasons[d.reason] = res.reasons.get(d.reason, 0) + 1
