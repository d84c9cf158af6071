"""Service-level checks of a run: latency, lag, recovery; and what the fleet cost.

Definitions (all over the measured window: first replayed message to the group drained):

- latency p50/p99/max: the handlers' end-to-end histogram for the window (see ``latency``
  for what it measures and its bucket resolution; the max is a bucket's upper bound);
- lag p99/max: nearest-rank percentiles of the once-a-second lag in seconds (age of the
  oldest unprocessed raw record, the scaler's own lag measure);
- recovery: for each disturbance (the end of a flash burst, each chaos drill), the time from
  it until lag is back under the lag target and stays there for ``hold`` seconds; the run's
  recovery is the worst of them. A disturbance after which lag never settles before the end
  of the run has no recovery time and fails the check;
- handler-seconds: the integral of the number of the run's live handler processes (counted in
  ``/proc``, see ``sampler``); the fixed fleet sized for the peak costs ``peak handlers x
  duration``. member-seconds: the integral of the group's members as the broker reports them
  (seconds the broker could not be read are left out).

A threshold of 0 turns its check off.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tickscale.loadtest.sampler import Sample


@dataclass(frozen=True)
class Thresholds:
    latency_p50_s: float = 1.0
    latency_p99_s: float = 5.0
    latency_max_s: float = 30.0
    lag_p99_s: float = 5.0
    lag_max_s: float = 30.0
    recovery_s: float = 60.0


@dataclass
class Check:
    name: str
    threshold: float
    value: float | None
    ok: bool
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (an observed value, never an interpolation)."""
    if not values:
        return None
    v = sorted(values)
    return v[max(0, math.ceil(q * len(v)) - 1)]


def window(samples: Sequence[Sample], t0: float, t1: float) -> list[Sample]:
    return [s for s in samples if t0 <= s.wall <= t1]


def lag_stats(samples: Sequence[Sample]) -> tuple[float | None, float | None]:
    lags = [s.lag_s for s in samples if s.lag_s is not None]
    return percentile(lags, 0.99), (max(lags) if lags else None)


def lag_above(samples: Sequence[Sample], target_s: float) -> float:
    """Wall seconds the lag spent above ``target_s``: each interval between two samples
    counts when the lag at its start was above (the simulator's lag-above-target)."""
    total = 0.0
    for a, b in itertools.pairwise(samples):
        if a.lag_s is not None and a.lag_s > target_s:
            total += b.wall - a.wall
    return total


@dataclass(frozen=True)
class Cost:
    handler_seconds: float
    peak_handlers: int
    duration_s: float
    member_seconds: float = 0.0

    @property
    def fixed_peak_handler_seconds(self) -> float:
        return self.peak_handlers * self.duration_s

    @property
    def ratio(self) -> float | None:
        fixed = self.fixed_peak_handler_seconds
        return None if fixed <= 0 else self.handler_seconds / fixed


def cost(samples: Sequence[Sample], t0: float, t1: float) -> Cost:
    """Handler-seconds over ``[t0, t1]``, each sample's count held until the next sample."""
    pts = sorted(samples, key=lambda s: s.wall)
    hs = ms = 0.0
    peak = 0
    for i, s in enumerate(pts):
        a = max(s.wall, t0)
        b = min(pts[i + 1].wall if i + 1 < len(pts) else t1, t1)
        if b > a:
            hs += s.handlers * (b - a)
            ms += (s.members or 0) * (b - a)
        if t0 <= s.wall <= t1:
            peak = max(peak, s.handlers)
    return Cost(hs, peak, max(0.0, t1 - t0), ms)


@dataclass(frozen=True)
class Recovery:
    label: str
    wall: float
    recovery_s: float | None  # None: lag had not settled under the target by the end
    peak_lag_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def recoveries(
    samples: Sequence[Sample],
    disturbances: Sequence[tuple[str, float]],
    t_end: float,
    target_s: float,
    hold_s: float | None = None,
) -> list[Recovery]:
    """Per disturbance: seconds until lag is at or under ``target_s`` for ``hold_s`` on end.

    An unknown lag (broker unreachable) counts as not recovered: an outage is not a pass.
    """
    hold = max(10.0, 2 * target_s) if hold_s is None else hold_s
    pts = sorted((s for s in samples if s.wall <= t_end), key=lambda s: s.wall)
    out = []
    for label, t in disturbances:
        after = [s for s in pts if s.wall >= t]
        peak = max((s.lag_s for s in after if s.lag_s is not None), default=0.0)
        rec: float | None = None
        for i, s in enumerate(after):
            if s.lag_s is None or s.lag_s > target_s:
                continue
            ok = True
            for later in after[i + 1 :]:
                if later.wall > s.wall + hold:
                    break
                if later.lag_s is None or later.lag_s > target_s:
                    ok = False
                    break
            if ok:
                rec = max(0.0, s.wall - t)
                break
        out.append(Recovery(label, t, rec, peak))
    return out


def evaluate(th: Thresholds, m: dict[str, Any], recs: Sequence[Recovery]) -> list[Check]:
    """The SLO checks of metrics ``m`` (the run's JSON fields) against ``th``."""
    checks = []
    for name, key, limit in (
        ("latency p50", "latency_p50_s", th.latency_p50_s),
        ("latency p99", "latency_p99_s", th.latency_p99_s),
        ("latency max", "latency_max_s", th.latency_max_s),
        ("lag p99", "lag_p99_s", th.lag_p99_s),
        ("lag max", "lag_max_s", th.lag_max_s),
    ):
        if limit <= 0:
            continue
        v = m.get(key)
        if v is None:
            checks.append(Check(name, limit, None, False, "not measured"))
        else:
            checks.append(Check(name, limit, v, v <= limit))
    if th.recovery_s > 0:
        if not recs:
            checks.append(Check("recovery", th.recovery_s, None, True, "no burst or drill"))
        else:
            unsettled = [r.label for r in recs if r.recovery_s is None]
            worst = max((r.recovery_s for r in recs if r.recovery_s is not None), default=None)
            if unsettled:
                note = "lag never settled after " + ", ".join(unsettled)
                checks.append(Check("recovery", th.recovery_s, worst, False, note))
            else:
                assert worst is not None
                checks.append(Check("recovery", th.recovery_s, worst, worst <= th.recovery_s))
    return checks
