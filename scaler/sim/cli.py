"""``tickscale scaler simulate``: a market day's message rate through our policy and the
reactive baseline (``--suite``: every day shape, several seeds, one table)."""

from __future__ import annotations

import datetime as dt
import sys
from typing import TYPE_CHECKING, Any

import orjson
import typer

from core.cli_settings import load, options_from
from scaler.sim.settings import SimulateSettings

if TYPE_CHECKING:
    from scaler.calendar import SessionCalendar
    from scaler.simulate import HandlerModel, RateSeries


def _fail(flag: str, msg: str) -> typer.Exit:
    typer.echo(f"error: invalid setting {flag}: {msg}", err=True)
    return typer.Exit(2)


@options_from(SimulateSettings)
def simulate(ctx: typer.Context, given: dict[str, Any]) -> None:
    """Backtest: a market day's message rate through our policy and the reactive baseline.

    With --suite: every day shape, five seeds each, against best-tuned KEDA+cron, the
    reactive baseline and a fixed peak fleet."""
    from scaler.simulate import HandlerModel, backtest

    s = load(SimulateSettings, given)
    model = HandlerModel(s.capacity, s.partitions, s.backend, capacity_error=s.capacity_error)
    if s.suite:
        _suite(model, s)
        return
    cal = _calendar(s)
    try:
        date = dt.date.fromisoformat(s.day) if s.day else cal.last_session()
    except ValueError as e:
        raise _fail("--date", str(e)) from None
    series = _series(s, cal, date)
    results = backtest(
        series, cal, model, min_handlers=s.min_handlers, max_handlers=s.max_handlers,
        lag_target_s=s.lag_target_s, keep_series=s.plot is not None,
    )  # fmt: skip
    if s.plot is not None:
        from scaler.simulate import plot as draw

        draw(series, results, s.plot, s.lag_target_s)
    if s.json_out:
        summary = {"policies": {r.name: r.summary() for r in results}}
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
        return
    _table(series, date, results, s)


def _calendar(s: SimulateSettings) -> SessionCalendar:
    from scaler.calendar import CalendarError, SessionCalendar, parse_session_min

    try:
        floors = parse_session_min(s.session_min)
    except ValueError as e:
        raise _fail("--session-min", str(e)) from None
    try:
        return SessionCalendar(s.calendar, floors, s.lead_s)
    except CalendarError as e:
        raise _fail("--calendar", str(e)) from None


def _series(s: SimulateSettings, cal: SessionCalendar, date: dt.date) -> RateSeries:
    from scaler.simulate import recorded_day, synthetic_day

    if s.source == "synthetic":
        close_s = cal.day(date).close_s
        return synthetic_day(date, close_s=close_s, symbols=s.symbols, seed=s.seed)
    if s.trace is None or not s.trace.exists():
        raise _fail("--trace", "an existing CSV file is required with --source trace")
    try:
        return recorded_day(s.trace, date, cal.tz)
    except ValueError as e:
        raise _fail("--trace", str(e)) from None


def _table(series: RateSeries, date: dt.date, results: list[Any], s: SimulateSettings) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"{series.source} on {date} ({len(series.rates):,} s, lag target {s.lag_target_s}s)"
    )
    t.add_column("metric")
    for r in results:
        t.add_column(r.name, justify="right")
    keys = ["handler_seconds", "lag_above_target_s", "peak_lag_s", "scale_events", "max_handlers"]
    for k in keys:
        t.add_row(k, *(str(r.summary()[k]) for r in results))
    Console().print(t)
    if s.plot is not None:
        Console().print(f"chart: {s.plot}")


def _suite(model: HandlerModel, s: SimulateSettings) -> None:
    from scaler.sim.days import SUITE
    from scaler.sim.suite import SuiteConfig, run_suite, table

    names = [d.strip() for d in s.days.split(",") if d.strip()]
    known = {d.name for d in SUITE}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise _fail("--days", f"unknown day {unknown[0]!r} (one of {', '.join(sorted(known))})")
    cfg = SuiteConfig(
        seeds=tuple(range(1, s.seeds + 1)), min_handlers=s.min_handlers,
        max_handlers=s.max_handlers, lag_target_s=s.lag_target_s, model=model,
        workers=s.workers,
    )  # fmt: skip
    chosen = [d for d in SUITE if not names or d.name in names]
    result = run_suite(cfg, chosen)
    if s.json_out:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return
    from rich.console import Console

    Console(width=200).print(table(result))
