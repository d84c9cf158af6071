"""Named scenarios: which stretch of the market day is replayed, how fast, with what burst.

A scenario only supplies defaults; ``--from``, ``--to``, ``--speed`` and ``--symbols`` win.

=============  ===========  =====  =======  ==================================================
name           window       speed  symbols  what it exercises
=============  ===========  =====  =======  ==================================================
full-day       04:00-20:00  120    10       the whole day compressed (16 h in 8 min): trickle,
                                            open, midday, close, after-hours; the handler-
                                            seconds comparison is about this one
open           09:25-10:00  20     50       pre-scaling for the open and the opening cross
close          15:45-16:05  20     50       the run into the closing cross and the drop after
flash-burst    09:25-09:50  10     50       a burst at a multiple of the peak rate (below)
after-hours    17:00-18:00  60     50       a quiet stretch: idle cost and scale-in
=============  ===========  =====  =======  ==================================================

full-day uses fewer symbols because the replay feed itself (one Python process that also
computes the manifest) tops out near 15-20k messages/s on a 2-core machine; 50 symbols at 120x
would make the open a test of the feed, not of the handlers.

**flash-burst.** The day's peak rate is the open's: the first minutes after 09:30 carry about
eight times the midday rate. The scenario replays from 09:25 at ``--speed``; at ``--burst-at``
(09:30) the feed switches to ``--burst-multiple`` x ``--speed`` for ``--burst-seconds`` wall
seconds, so it publishes ``burst_seconds x multiple x speed`` market seconds of the open in
that time, at ``multiple`` times the peak rate the run otherwise reaches. Then it drops back to
``--speed`` for ten market minutes (or up to ``--to``), during which the time to recover is
measured: from the end of the burst to lag back under the target.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ingest.replay.source import parse_hhmm, parse_only

AFTER_BURST_S = 600  # market seconds replayed at the base speed after a flash burst


@dataclass(frozen=True)
class Scenario:
    name: str
    start: str
    end: str | None  # None: computed (flash-burst)
    speed: float
    symbols: int
    description: str


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("full-day", "04:00", "20:00", 120.0, 10, "the whole day, compressed"),
        Scenario("open", "09:25", "10:00", 20.0, 50, "the open and the opening cross"),
        Scenario("close", "15:45", "16:05", 20.0, 50, "the close and the closing cross"),
        Scenario("flash-burst", "09:25", None, 10.0, 50, "a multiple of the peak rate"),
        Scenario("after-hours", "17:00", "18:00", 60.0, 50, "a quiet stretch"),
    )
}


@dataclass(frozen=True)
class Burst:
    """Market seconds since midnight ``[start_s, end_s)`` replayed ``multiple`` x faster."""

    start_s: int
    end_s: int
    multiple: float
    wall_s: float


@dataclass(frozen=True)
class ReplayPlan:
    """Everything the feed child needs to replay one scenario."""

    scenario: str
    source: str  # synthetic | itch | jsonl
    file: Path | None
    symbols: int
    seed: int
    rate: float
    date: str | None
    start: str | None
    end: str | None
    speed: float | None  # None = as fast as the broker takes it
    burst: Burst | None = None
    malformed_every: int = 0
    only: str | None = None  # comma-separated symbols: replay only these

    @property
    def start_s(self) -> int | None:
        return None if self.start is None else parse_hhmm(self.start)

    @property
    def end_s(self) -> int | None:
        return None if self.end is None else parse_hhmm(self.end)

    def feed_args(self) -> list[str]:
        """Command-line arguments of ``tickscale.loadtest.feed`` for this plan."""
        args = [
            "--source", self.source, "--symbols", str(self.symbols), "--seed", str(self.seed),
            "--rate", str(self.rate), "--speed", "max" if self.speed is None else str(self.speed),
            "--malformed-every", str(self.malformed_every),
        ]  # fmt: skip
        if self.file is not None:
            args += ["--file", str(self.file)]
        if self.date:
            args += ["--date", self.date]
        if self.start:
            args += ["--from", self.start]
        if self.end:
            args += ["--to", self.end]
        if self.only:
            args += ["--only", self.only]
        if self.burst is not None:
            b = self.burst
            args += [
                "--burst-from", str(b.start_s), "--burst-to", str(b.end_s),
                "--burst-multiple", str(b.multiple),
            ]  # fmt: skip
        return args


def parse_speed(value: str) -> float | None:
    """A replay speed: a positive number, or "max" (None: as fast as the broker takes it)."""
    if value.lower() == "max":
        return None
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"--speed: expected a number or 'max', got {value!r}") from None
    if v <= 0:
        raise ValueError("--speed: must be > 0")
    return v


def hhmmss(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass(frozen=True)
class PlanOptions:
    """The command line's overrides of a scenario; None: the scenario's own."""

    source: str = "synthetic"
    file: Path | None = None
    symbols: int | None = None
    seed: int = 1
    rate: float = 1.0
    date: str | None = None
    start: str | None = None
    end: str | None = None
    speed: str | None = None  # a number, "max", or None for the scenario's
    burst_at: str = "09:30"
    burst_multiple: float = 3.0
    burst_seconds: float = 20.0
    malformed_every: int = 0
    only: str | None = None


def resolve(name: str, options: PlanOptions | None = None) -> ReplayPlan:
    """The plan for scenario ``name`` with the command line's overrides applied; ValueError
    names the offending option."""
    o = options or PlanOptions()
    source, file, symbols, seed, rate, date = o.source, o.file, o.symbols, o.seed, o.rate, o.date
    start, end, speed, only, malformed_every = o.start, o.end, o.speed, o.only, o.malformed_every
    burst_at, burst_multiple, burst_seconds = o.burst_at, o.burst_multiple, o.burst_seconds
    sc = SCENARIOS.get(name)
    if sc is None:
        raise ValueError(f"--scenario: unknown scenario {name!r} (one of {', '.join(SCENARIOS)})")
    sp = sc.speed if speed is None else parse_speed(speed)
    try:
        parse_only(only)
    except ValueError as e:
        raise ValueError(f"--only: {e}") from None
    plan = ReplayPlan(
        scenario=name,
        source=source,
        file=file,
        symbols=symbols or sc.symbols,
        seed=seed,
        rate=rate,
        date=date,
        start=start or sc.start,
        end=end or sc.end,
        speed=sp,
        malformed_every=malformed_every,
        only=only,
    )
    for opt, v in (("--from", plan.start), ("--to", plan.end), ("--burst-at", burst_at)):
        if v is not None:
            try:
                parse_hhmm(v)
            except ValueError as e:
                raise ValueError(f"{opt}: {e}") from None
    if name == "flash-burst":
        if sp is None:
            raise ValueError("--speed: flash-burst needs a numeric base speed, not max")
        if burst_multiple <= 1 or burst_seconds <= 0:
            raise ValueError("--burst-multiple must be > 1 and --burst-seconds > 0")
        b0 = parse_hhmm(burst_at)
        b1 = b0 + round(burst_seconds * burst_multiple * sp)
        assert plan.start_s is not None
        if b0 <= plan.start_s:
            raise ValueError(f"--burst-at {burst_at} must be after --from {plan.start}")
        burst = Burst(b0, b1, burst_multiple, burst_seconds)
        plan = replace(plan, burst=burst, end=plan.end or hhmmss(min(b1 + AFTER_BURST_S, 86_399)))
        if plan.end_s is not None and plan.end_s <= b1:
            raise ValueError(f"--to {plan.end} must be after the burst's end ({hhmmss(b1)})")
    if plan.start_s is not None and plan.end_s is not None and plan.end_s <= plan.start_s:
        raise ValueError("--to: must be after --from")
    return plan
