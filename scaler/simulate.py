"""Offline backtest: a day's message rate through a policy and a model of the handlers.

The handler model lives in ``scaler.sim.engine`` (in-flight lag, measured
start-up and rebalance pauses, varying capacity, only observable signals); this
module makes the days (synthetic or recorded) and runs policies over them.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.sessions import AFTER_HOURS_END, CLOSE, PRE_MARKET_START, relative_rate
from scaler.calendar import SessionCalendar
from scaler.sim.engine import Decider, HandlerModel, SimResult, run

__all__ = ["Decider", "HandlerModel", "SimResult", "run"]  # re-exported


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
    volume: float = 1.0,
    shift_s: int = 0,
    crash: tuple[int, float, float] | None = None,
) -> RateSeries:
    """The U-shaped day of ``core.sessions`` scaled to ``symbols``, with noise and news.

    Noise: multiplicative per-second jitter plus a few news bursts (2-4x, decaying
    over minutes) at random times, all from ``seed``, so the reactive signals get
    something to react to that the calendar cannot predict.

    :param volume: the whole day's rate times this (a quiet or a heavy day).
    :param shift_s: the day's shape runs this much later than the clock says.
    :param crash: (time, peak multiple, decay s): a flash crash no calendar knows.
    """
    # The whole day the feed covers, pre-market to the end of after-hours.
    start_s, end_s = PRE_MARKET_START, AFTER_HOURS_END
    rng = random.Random(seed)
    base = symbols * per_symbol * volume
    bursts_crash = [crash] if crash is not None else []
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
        rel = relative_rate(ts - shift_s, close=close_s)
        for b_t, amp, decay in bursts + bursts_crash:
            if b_t <= ts < b_t + 5 * decay:
                rel *= 1.0 + amp * math.exp(-(ts - b_t) / decay)
        # AR(1) jitter: minutes of slightly busier or quieter trading, not white noise.
        smooth = 0.98 * smooth + 0.02 * rng.lognormvariate(0.0, 0.5)
        rates.append(max(0.0, base * rel * smooth * rng.lognormvariate(0.0, 0.1)))
    name = f"synthetic(seed={seed},symbols={symbols},volume={volume:g})"
    return RateSeries(date, start_s, rates, name)


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


def compare(
    series: RateSeries,
    deciders: Sequence[Callable[[], Decider]],
    model: HandlerModel,
    lag_target_s: float,
    calendar: SessionCalendar,
    keep_series: bool = False,
) -> list[SimResult]:
    midnight = calendar.local_midnight(series.date)
    return [
        run(series.rates, series.start_s, make(), model, lag_target_s, midnight, keep_series)
        for make in deciders
    ]


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
            fallback_capacity=model.capacity * (1 + model.capacity_error),
            rebalance_pause_s=model.pauses.rebalance_s[1],
        )
        return Policy(cfg, calendar)

    def reactive() -> Decider:
        return ReactiveBaseline(
            BaselineConfig(min_replicas=max(min_handlers, 1), max_replicas=max_handlers)
        )

    return compare(series, [ours, reactive], model, lag_target_s, calendar, keep_series)
