"""A rollout's guard: does the canary behave at least about as well as the current fleet?

Both sides are read from what every handler already reports about itself in
Redis (``REDIS_HANDLER_STATS + id``, cumulative since its start; see
``ingest.metrics.guard_figures``): records, dead letters, decode errors, its
end-to-end latency histogram, the lag of the partitions it owns. The current
version's figures, the canary's too, are deltas from a baseline taken when the guard
window opened, after the canary's warm-up (restoring books, catching up the
backlog it was handed, which would otherwise weigh on its latency). Restarts: a
canary that exits counts one, and the scaler never restarts it.

Each threshold is an allowed excess of the canary over the current version, so
a feed that dead-letters a little anyway does not fail every rollout. An
empty current side (a fleet of one, all partitions with the canary) leaves the
canary judged against the margins alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import orjson
from redis.asyncio import Redis

from core.constants import REDIS_HANDLER_STATS

# The handler's latency histogram bounds (ingest.metrics._LAT_BUCKETS), in order; the
# handler reports one count more, the total (+Inf).
E2E_BOUNDS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25,
    0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip


class GuardError(ValueError):
    """A ``--guard`` override names no threshold or is not a number."""


@dataclass(frozen=True)
class GuardConfig:
    """Thresholds (``--guard key=value,...``); the canary fails on any one exceeded."""

    warmup_s: float = 15.0  # wall seconds after the canary's first report, not judged:
    # it restores its partitions' books and catches up the backlog it was handed
    window_s: float = 120.0  # market seconds of canary before a verdict
    min_records: int = 200  # the canary's records needed for a verdict
    max_wait_s: float = 600.0  # wall seconds to reach them (and readiness), else roll back
    deadletters_per_1000: float = 1.0  # canary minus current, per 1,000 records
    decode_errors_per_1000: float = 1.0
    p99_ratio: float = 1.5  # canary e2e p99 <= current p99 * ratio + p99_slack_s
    p99_slack_s: float = 0.25
    lag_ratio: float = 2.0  # canary lag per partition <= current's * ratio + lag_slack
    lag_slack: float = 5000.0
    restarts: int = 0
    step_s: float = 5.0  # wall seconds between promotion steps, after the new one is up
    join_s: float = 60.0  # wall seconds for a new handler to join before the one it
    # replaces is stopped (scaler.handover); past them, that one keeps running

    @classmethod
    def parse(cls, text: str, base: GuardConfig | None = None) -> GuardConfig:
        """``key=value,...`` over ``base`` (default: the defaults above)."""
        cfg = base or cls()
        known = {f.name: f.type for f in fields(cls)}
        changes: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or key not in known:
                raise GuardError(f"{part!r}: expected key=value with key one of {', '.join(known)}")
            try:
                num = int(value) if known[key] == "int" else float(value)
            except ValueError:
                raise GuardError(f"{key}: {value!r} is not a number") from None
            if num < 0 or not math.isfinite(num):
                raise GuardError(f"{key}: {value!r} must be a finite number >= 0")
            changes[key] = num
        return replace(cfg, **changes)

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Figures:
    """One side's counts over the window."""

    records: float = 0.0
    deadletters: float = 0.0
    decode_errors: float = 0.0
    lag: float = 0.0  # now, summed over the side's partitions
    assigned: float = 0.0
    buckets: list[float] | None = None  # cumulative e2e histogram counts, +Inf last

    def add(self, now: dict[str, Any], base: dict[str, Any] | None) -> None:
        b = base or {}
        for k in ("records", "deadletters", "decode_errors"):
            setattr(self, k, getattr(self, k) + max(0.0, now.get(k, 0.0) - b.get(k, 0.0)))
        self.lag += now.get("lag", 0.0)
        self.assigned += now.get("assigned", 0.0)
        cur = now.get("e2e_buckets") or []
        old = b.get("e2e_buckets") or [0.0] * len(cur)
        if len(old) != len(cur):
            old = [0.0] * len(cur)
        delta = [max(0.0, c - o) for c, o in zip(cur, old, strict=True)]
        self.buckets = (
            delta
            if self.buckets is None
            else [a + d for a, d in zip(self.buckets, delta, strict=False)]
        )

    def per_1000(self, what: float) -> float:
        return 1000.0 * what / self.records if self.records else 0.0

    def p99(self) -> float | None:
        """Upper bound of the bucket holding the 99th percentile (None: no observations)."""
        counts = self.buckets or []
        if not counts or counts[-1] <= 0:
            return None
        want = 0.99 * counts[-1]
        for bound, n in zip(E2E_BOUNDS, counts, strict=False):
            if n >= want:
                return float(bound)
        return float(E2E_BOUNDS[-1])  # beyond the last bound: report that bound

    def lag_per_partition(self) -> float:
        return self.lag / self.assigned if self.assigned else 0.0

    def summary(self) -> dict[str, float | None]:
        return {
            "records": self.records,
            "deadletters_per_1000": round(self.per_1000(self.deadletters), 3),
            "decode_errors_per_1000": round(self.per_1000(self.decode_errors), 3),
            "p99_s": self.p99(),
            "lag_per_partition": round(self.lag_per_partition(), 1),
        }


async def read_figures(redis: Redis, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each named handler's cumulative guard figures (absent: not reporting yet)."""
    if not names:
        return {}
    async with redis.pipeline(transaction=False) as p:
        for n in names:
            p.hgetall(REDIS_HANDLER_STATS + n)
        rows = await p.execute()
    out: dict[str, dict[str, Any]] = {}
    for name, row in zip(names, rows, strict=True):
        d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in (row or {}).items()}
        if "records" not in d:
            continue
        try:
            out[name] = {
                k: float(d[k])
                for k in ("records", "deadletters", "decode_errors", "lag", "assigned")
                if k in d
            } | {"e2e_buckets": orjson.loads(d.get("e2e_buckets", b"[]"))}
        except (ValueError, orjson.JSONDecodeError):
            continue
    return out


def poisson_bound(expected: float, p: float = 0.001) -> int:
    """The smallest k a Poisson count of mean ``expected`` exceeds with probability < p."""
    term = total = math.exp(-expected)
    k = 0
    while 1.0 - total >= p:
        k += 1
        term *= expected / k
        total += term
    return k


def enough_records(cfg: GuardConfig, canary: Figures, current: Figures) -> bool:
    """Both sides need ``min_records`` before any verdict: a current side still at zero
    (its handlers report once a second, and a window can be a second old) would make a
    single dead letter of the canary's look like a regression. A current side that owns
    no partition (a fleet of one, or more handlers than partitions) is empty, and the
    canary is judged against the margins alone."""
    if canary.records < cfg.min_records:
        return False
    return current.assigned == 0 or current.records >= cfg.min_records


def judge(
    cfg: GuardConfig, canary: Figures, current: Figures, restarts: int, final: bool = True
) -> str | None:
    """The first threshold the canary exceeds, as a sentence; None when within all.

    Before the window ends (``final`` False) only the counts are judged: one bad
    record in a thousand is bad at any time, while a p99 or a lag needs the window.
    """
    if restarts > cfg.restarts:
        return f"canary restarts {restarts} > {cfg.restarts}"
    for what, limit in (
        ("deadletters", cfg.deadletters_per_1000),
        ("decode_errors", cfg.decode_errors_per_1000),
    ):
        n = getattr(canary, what)
        c, o = canary.per_1000(n), current.per_1000(getattr(current, what))
        # More than the allowed rate *and* more than chance: bad records of a feed come
        # unevenly (3 in 440 records is 6.8 per 1,000 where the fleet sees 1.6, and
        # chance), while a version that spoils one in ten is beyond doubt in a hundred.
        if c > o + limit and n > poisson_bound(canary.records * (o + limit) / 1000.0):
            return (
                f"{what} per 1,000 records {c:.2f} > current {o:.2f} + {limit:g} "
                f"({n:.0f} of {canary.records:.0f} records)"
            )
    if not final:
        return None
    cp, op = canary.p99(), current.p99()
    if cp is not None:
        bound = (op or 0.0) * cfg.p99_ratio + cfg.p99_slack_s
        if cp > bound:
            return f"e2e p99 {cp:g}s > {bound:g}s (current {op}s)"
    cl, ol = canary.lag_per_partition(), current.lag_per_partition()
    bound = ol * cfg.lag_ratio + cfg.lag_slack
    if cl > bound:
        return f"lag per partition {cl:.0f} > {bound:.0f} (current {ol:.0f})"
    return None
