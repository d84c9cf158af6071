"""Offline backtest: a day's message rate through a policy and a model of the handlers.

The handler model is deliberately the part the reactive autoscaler ignores:

* each handler sustains ``capacity`` msgs/s, and the group only as much as its
  busiest member allows (ceil(P/n) partitions on one handler);
* a new handler costs ``startup_s`` before it joins the group;
* every join or leave stops the whole group for ``rebalance_pause_s`` (aiokafka
  rebalances eagerly), so each scale step costs throughput.

Both policies see the same rate series, one step per second, and are scored on
handler-seconds (cost), seconds with lag above the target, peak lag and
number of scale events.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.sessions import AFTER_HOURS_END, CLOSE, PRE_MARKET_START, relative_rate
from scaler.calendar import SessionCalendar
from scaler.capacity import CapacityEstimator, HandlerStats
from scaler.policy import Decision, group_throughput
from scaler.signals import Ewma, Snapshot


class Decider(Protocol):
    name: str

    def decide(self, snap: Snapshot, now: float, current: int) -> Decision: ...

    def applied(self, decision: Decision) -> None: ...


@dataclass(frozen=True)
class HandlerModel:
    capacity: float = 2500.0  # msgs/s one handler sustains
    partitions: int = 12
    startup_s: float = 8.0  # process/container start to JoinGroup
    rebalance_pause_s: float = 4.0  # whole group stopped per join or leave
    initial: int = 1  # handlers running when the day starts


@dataclass
class RateSeries:
    """Messages per second for each second from ``start_s`` (seconds since midnight)."""

    date: dt.date
    start_s: int
    rates: list[float]
    source: str

    @property
    def end_s(self) -> int:
        return self.start_s + len(self.rates)


def synthetic_day(
    date: dt.date,
    close_s: int = CLOSE,
    symbols: int = 500,
    per_symbol: float = 4.0,
    seed: int = 1,
    start_s: int = PRE_MARKET_START,
    end_s: int = AFTER_HOURS_END,
) -> RateSeries:
    """The U-shaped day of ``core.sessions`` scaled to ``symbols``, with noise and news.

    Noise: multiplicative per-second jitter plus a few news bursts (2-4x, decaying
    over minutes) at random times, all from ``seed``, so the reactive signals get
    something to react to that the calendar cannot predict.
    """
    rng = random.Random(seed)
    base = symbols * per_symbol
    n = end_s - start_s
    bursts: list[tuple[int, float, float]] = []
    t = start_s
    while True:
        t += int(rng.expovariate(1 / 3600.0))  # about one news burst an hour
        if t >= end_s:
            break
        bursts.append((t, rng.uniform(1.0, 3.0), rng.uniform(60.0, 300.0)))
    rates: list[float] = []
    smooth = 1.0
    for i in range(n):
        ts = start_s + i
        rel = relative_rate(ts, close=close_s)
        for b_t, amp, decay in bursts:
            if b_t <= ts < b_t + 5 * decay:
                rel *= 1.0 + amp * math.exp(-(ts - b_t) / decay)
        # AR(1) jitter: minutes of slightly busier or quieter trading, not white noise.
        smooth = 0.98 * smooth + 0.02 * rng.lognormvariate(0.0, 0.5)
        rates.append(max(0.0, base * rel * smooth * rng.lognormvariate(0.0, 0.1)))
    return RateSeries(date, start_s, rates, f"synthetic(seed={seed},symbols={symbols})")


def _parse_time(value: str, date: dt.date, tz: dt.tzinfo) -> float:
    v = value.strip()
    try:
        return float(v)  # seconds since midnight
    except ValueError:
        pass
    if ":" in v and len(v) <= 8:
        parts = [int(x) for x in v.split(":")]
        while len(parts) < 3:
            parts.append(0)
        return parts[0] * 3600 + parts[1] * 60 + parts[2]
    d = dt.datetime.fromisoformat(v)
    if d.tzinfo is None:
        d = d.replace(tzinfo=tz)
    midnight = dt.datetime.combine(date, dt.time(0), tzinfo=tz)
    return (d - midnight).total_seconds()


def recorded_day(path: Path, date: dt.date, tz: dt.tzinfo) -> RateSeries:
    """A CSV of ``time, messages per second`` (header optional), held until the next row.

    ``time`` is seconds since midnight, ``HH:MM[:SS]`` (exchange time) or ISO 8601.
    """
    points: list[tuple[float, float]] = []
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].strip().startswith("#"):
                continue
            try:
                points.append((_parse_time(row[0], date, tz), float(row[1])))
            except (ValueError, IndexError):
                if points:
                    raise ValueError(f"{path}: bad row {row!r}") from None
                continue  # header
    if len(points) < 1:
        raise ValueError(f"{path}: no (time, rate) rows")
    points.sort()
    start = int(points[0][0])
    end = math.ceil(points[-1][0]) + 1
    times = [p[0] for p in points]
    rates = []
    for s in range(start, end):
        i = bisect.bisect_right(times, s) - 1
        rates.append(max(points[max(i, 0)][1], 0.0))
    return RateSeries(date, start, rates, f"recorded({path.name})")


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
    # Per-second series for the chart.
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
    leaving_at: float | None = None


def run(
    series: RateSeries,
    decider: Decider,
    model: HandlerModel,
    lag_target_s: float,
    midnight: float,
    keep_series: bool = False,
) -> SimResult:
    """Step the day one second at a time through ``decider`` and the handler model.

    :param midnight: unix time of the day's local midnight (the calendar needs real time).
    """
    res = SimResult(decider.name)
    cap = model.capacity
    parts = model.partitions
    handlers = [_Handler(ready_at=-math.inf) for _ in range(model.initial)]
    members = model.initial
    pause_until = -math.inf
    arrived_cum: list[float] = []  # cumulative arrivals at the end of each second
    arrived = 0.0
    processed = 0.0
    est = CapacityEstimator(window_s=60.0)
    busy = 0.0
    ingest = Ewma(5.0)
    proc_rate = Ewma(5.0)
    for i, rate in enumerate(series.rates):
        t = series.start_s + i
        now = midnight + t
        arrived += rate
        arrived_cum.append(arrived)

        # Membership changes (a handler finished starting, or finished draining).
        handlers = [h for h in handlers if h.leaving_at is None or h.leaving_at > t]
        joined = sum(1 for h in handlers if h.ready_at <= t and h.leaving_at is None)
        if joined != members:
            members = joined
            pause_until = t + model.rebalance_pause_s

        done = 0.0
        if t >= pause_until and members > 0:
            done = min(arrived - processed, group_throughput(members, cap, parts))
        processed += done
        busy += done / cap
        est.observe(HandlerStats("all", int(processed), busy, now))

        backlog = arrived - processed
        if backlog <= 1e-6:
            lag_s = 0.0
        else:
            k = bisect.bisect_right(arrived_cum, processed)
            # The oldest unprocessed message arrived during second k; interpolate.
            prev = arrived_cum[k - 1] if k > 0 else 0.0
            frac = (processed - prev) / max(arrived_cum[k] - prev, 1e-9)
            lag_s = max(0.0, i - (k + frac) + 1)

        learned = est.estimate()
        snap = Snapshot(
            time=now,
            lag_msgs=int(backlog),
            lag_s=lag_s,
            ingest_rate=ingest.update(rate, 1.0),
            process_rate=proc_rate.update(done, 1.0),
            members=members,
            partitions_hint=parts,
            group_state="PreparingRebalance" if t < pause_until else "Stable",
            capacity=learned,
            capacity_source="learned" if learned else "fallback",
        )
        current = sum(1 for h in handlers if h.leaving_at is None)
        d = decider.decide(snap, now, current)
        if d.desired > current:
            handlers += [_Handler(ready_at=t + model.startup_s) for _ in range(d.desired - current)]
        elif d.desired < current:
            # Remove the youngest first: a handler still starting costs no rebalance.
            live = sorted((h for h in handlers if h.leaving_at is None), key=lambda h: -h.ready_at)
            for h in live[: current - d.desired]:
                h.leaving_at = t + 1 if h.ready_at <= t else t
        if d.changes:
            decider.applied(d)
            res.scale_events += 1
            res.reasons[d.reason] = res.reasons.get(d.reason, 0) + 1

        n_cost = len(handlers)  # starting and draining handlers cost too
        res.handler_seconds += n_cost
        res.max_handlers = max(res.max_handlers, n_cost)
        if lag_s > lag_target_s:
            res.lag_above_target_s += 1
        res.peak_lag_s = max(res.peak_lag_s, lag_s)
        res.peak_lag_msgs = max(res.peak_lag_msgs, backlog)
        if keep_series:
            res.times.append(t)
            res.handlers.append(n_cost)
            res.lag_s.append(lag_s)
    res.unprocessed_at_end = arrived - processed
    return res


def compare(
    series: RateSeries,
    deciders: Sequence[Callable[[], Decider]],
    model: HandlerModel,
    lag_target_s: float,
    calendar: SessionCalendar,
    keep_series: bool = False,
) -> list[SimResult]:
    midnight = calendar.local_midnight(series.date)
    return [run(series, make(), model, lag_target_s, midnight, keep_series) for make in deciders]


def plot(series: RateSeries, results: Sequence[SimResult], path: Path, target_s: float) -> None:
    """Rate, lag and handlers over the day, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [(series.start_s + i) / 3600 for i in range(len(series.rates))]
    fig, axes = plt.subplots(3, 1, figsize=(12, 9), sharex=True)
    axes[0].plot(hours, series.rates, lw=0.5, color="grey")
    axes[0].set_ylabel("msgs/s into md.raw")
    for r in results:
        h = [t / 3600 for t in r.times]
        axes[1].plot(h, r.lag_s, lw=0.8, label=r.name)
        axes[2].step(h, r.handlers, lw=0.8, where="post", label=r.name)
    axes[1].axhline(target_s, color="red", lw=0.5, ls="--", label="lag target")
    axes[1].set_ylabel("lag (s)")
    axes[1].set_yscale("symlog", linthresh=max(target_s, 1.0))
    axes[2].set_ylabel("handlers")
    axes[2].set_xlabel(f"hour ({series.date}, exchange time)")
    for ax in axes[1:]:
        ax.legend(loc="upper right")
    fig.suptitle(f"tickscale vs reactive (KEDA+HPA): {series.source}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def backtest(
    series: RateSeries,
    calendar: SessionCalendar,
    model: HandlerModel,
    *,
    min_handlers: int = 1,
    max_handlers: int = 12,
    lag_target_s: float = 5.0,
    keep_series: bool = False,
) -> list[SimResult]:
    """Our policy and the reactive baseline over the same day, same model, same bounds."""
    from scaler.baseline import BaselineConfig, ReactiveBaseline
    from scaler.policy import Policy, PolicyConfig

    def ours() -> Decider:
        cfg = PolicyConfig(
            min_handlers=min_handlers,
            max_handlers=max_handlers,
            lag_target_s=lag_target_s,
            fallback_capacity=model.capacity,
            rebalance_pause_s=model.rebalance_pause_s,
        )
        return Policy(cfg, calendar)

    def reactive() -> Decider:
        return ReactiveBaseline(
            BaselineConfig(min_replicas=max(min_handlers, 1), max_replicas=max_handlers)
        )

    return compare(series, [ours, reactive], model, lag_target_s, calendar, keep_series)
