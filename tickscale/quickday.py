"""``tickscale up``'s first run: a whole synthetic day in about two minutes.

The load test's full-day scenario, compressed further (480x, five instruments),
on a Kafka broker and a Redis of its own on free loopback ports: the scaler
grows the fleet for the open and shrinks it after the close while a live view
shows the session, the handlers, the lag and the ticks. It ends with the
ledger line and the load test's HTML report of the day. The longer day on the
standard ports is ``tickscale up --full-day``.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

QUICK_SPEED = 480.0  # 16 market hours in 2 wall minutes
QUICK_SYMBOLS = 5  # the open at 480x stays within what one replay process publishes
QUICK_MAX_HANDLERS = 4


def run_quick_day(seed: int, day: str | None, out: Path | None, console: Console) -> int:
    """Replay the compressed day, verify it and write its report; the exit code."""
    from ingest.codecs.errors import SourceError
    from ingest.replay.spec import resolve_day
    from tickscale.loadtest.runner import LoadTestConfig, RunError, parse_policy, run_loadtest
    from tickscale.loadtest.scenarios import PlanOptions, resolve

    try:
        resolve_day(day)  # a holiday or a malformed date fails here, before anything starts
    except SourceError as e:
        console.print(f"error: {e.where}: {e.what}", soft_wrap=True)
        return 2
    opts = PlanOptions(symbols=QUICK_SYMBOLS, seed=seed, date=day, speed=str(QUICK_SPEED))
    plan = resolve("full-day", opts)
    cfg = LoadTestConfig(
        plan=plan,
        policy=parse_policy("tickscale", 1, QUICK_MAX_HANDLERS),
        out_dir=out,
        progress=console.is_terminal,
    )
    try:
        rc, _ = run_loadtest(cfg, console)
    except (RunError, RuntimeError, TimeoutError, OSError) as e:
        console.print(f"[red]error:[/] {e}")
        return 1
    return rc
