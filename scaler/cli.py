"""``tickscale scaler`` (run the scaler) and ``tickscale scaler simulate`` (policy backtest)."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from pydantic import ValidationError

if TYPE_CHECKING:
    from scaler.service import Scaler

app = typer.Typer(
    help="Autoscale the feed handlers on lag, rate and the trading calendar.",
    no_args_is_help=False,
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Settings field -> flag, for error messages that name what the user typed.
FLAGS = {
    "bootstrap": "--bootstrap", "redis_url": "--redis-url", "topic": "--topic",
    "group": "--group", "backend": "--backend", "policy": "--policy", "poll_s": "--poll",
    "dry_run": "--dry-run", "scaler_id": "--id", "name": "--name",
    "metrics_port": "--metrics-port", "min_handlers": "--min-handlers",
    "max_handlers": "--max-handlers", "lag_target_s": "--lag-target",
    "calendar": "--calendar", "session_min": "--session-min", "lead_s": "--lead",
    "clock": "--clock", "image": "--image", "network": "--network",
    "docker_host": "--docker-host", "swarm_service": "--swarm-service",
    "stop_grace_s": "--stop-grace", "handler_base_port": "--handler-base-port",
    "state_dir": "--state-dir", "scale_down_window_s": "--scale-down-window",
    "settle_s": "--settle", "lease_ttl_s": "--lease-ttl", "rollout_guard": "--rollout-guard",
}  # fmt: skip


@dataclass(frozen=True)
class Hooks:
    """What a program embedding this command adds to the scaler it runs (see ``main``).

    ``on_built`` is called with the assembled scaler, on its event loop, before it starts:
    the place to add, e.g., a signal handler that acts on the running scaler. The command's
    flags, settings and code path stay those of ``tickscale scaler``.
    """

    on_built: Callable[[Scaler], None] | None = None


def main(hooks: Hooks, prog_name: str = "tickscale scaler") -> None:
    """Run this command (flags from sys.argv) with ``hooks``; they reach ``run`` as its
    context object."""
    app(prog_name=prog_name, obj=hooks)


def _fail(setting: str, msg: str) -> None:
    typer.echo(f"error: invalid setting {FLAGS.get(setting, setting)}: {msg}", err=True)
    raise typer.Exit(2)


def _settings(overrides: dict[str, Any]) -> Any:
    from scaler.settings import ScalerSettings

    try:
        return ScalerSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        for err in e.errors():
            loc = str(err["loc"][0]) if err["loc"] else ""
            if not loc:  # a check across settings: its message names them
                loc = "min_handlers" if "min_handlers" in err["msg"] else "settings"
            typer.echo(f"error: invalid setting {FLAGS.get(loc, loc)}: {err['msg']}", err=True)
        raise typer.Exit(2) from None


@app.callback()
def run(
    ctx: typer.Context,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka HOST:PORT")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL (lease, audit)")] = None,
    topic: Annotated[str | None, typer.Option(help="raw topic the handlers read")] = None,
    group: Annotated[str | None, typer.Option(help="handler consumer group")] = None,
    backend: Annotated[str | None, typer.Option(help="process | docker | swarm")] = None,
    policy: Annotated[str | None, typer.Option(help="tickscale | reactive")] = None,
    poll: Annotated[float | None, typer.Option(help="seconds between polls")] = None,
    dry_run: Annotated[bool | None, typer.Option(help="decide and log only")] = None,
    scaler_id: Annotated[str | None, typer.Option("--id", help="this scaler's identity")] = None,
    name: Annotated[str | None, typer.Option(help="fleet name (labels, lease)")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="/metrics, /healthz port")] = None,
    min_handlers: Annotated[int | None, typer.Option()] = None,
    max_handlers: Annotated[int | None, typer.Option()] = None,
    lag_target: Annotated[float | None, typer.Option(help="seconds")] = None,
    calendar: Annotated[str | None, typer.Option(help="XNYS, XNAS, ... or none")] = None,
    session_min: Annotated[str | None, typer.Option(help="e.g. open=8,close=4")] = None,
    lead: Annotated[float | None, typer.Option(help="pre-scale lead, seconds")] = None,
    clock: Annotated[str | None, typer.Option(help="wall | replay")] = None,
    image: Annotated[str | None, typer.Option(help="docker/swarm: handler image")] = None,
    network: Annotated[str | None, typer.Option(help="docker/swarm: network")] = None,
    docker_host: Annotated[str | None, typer.Option(help="docker/swarm: engine URL")] = None,
    swarm_service: Annotated[str | None, typer.Option(help="swarm: service name")] = None,
    stop_grace: Annotated[float | None, typer.Option(help="SIGTERM to SIGKILL, s")] = None,
    handler_base_port: Annotated[int | None, typer.Option(help="process: ports")] = None,
    state_dir: Annotated[str | None, typer.Option(help="process: logs, targets")] = None,
    scale_down_window: Annotated[float | None, typer.Option(help="seconds")] = None,
    settle: Annotated[float | None, typer.Option(help="seconds between changes")] = None,
    lease_ttl: Annotated[float | None, typer.Option(help="leader lease, seconds")] = None,
    rollout_guard: Annotated[str | None, typer.Option(help="rollout guard, k=v,...")] = None,
) -> None:
    """Run the scaler (settings also from TICKSCALE_SCALER_* variables; flags win)."""
    if ctx.invoked_subcommand is not None:
        return
    # Mounted under `tickscale`, nothing sets a context object: no hooks.
    hooks = ctx.obj if isinstance(ctx.obj, Hooks) else Hooks()
    s = _settings({
        "bootstrap": bootstrap, "redis_url": redis_url, "topic": topic, "group": group,
        "backend": backend, "policy": policy, "poll_s": poll, "dry_run": dry_run,
        "scaler_id": scaler_id, "name": name, "metrics_port": metrics_port,
        "min_handlers": min_handlers, "max_handlers": max_handlers, "lag_target_s": lag_target,
        "calendar": calendar, "session_min": session_min, "lead_s": lead, "clock": clock,
        "image": image, "network": network, "docker_host": docker_host,
        "swarm_service": swarm_service, "stop_grace_s": stop_grace,
        "handler_base_port": handler_base_port, "state_dir": state_dir,
        "scale_down_window_s": scale_down_window, "settle_s": settle, "lease_ttl_s": lease_ttl,
        "rollout_guard": rollout_guard,
    })  # fmt: skip
    from scaler.app import StartupError, build
    from scaler.backends.base import BackendError

    async def main() -> None:
        try:
            scaler = await build(s)
        except StartupError as e:
            _fail(e.setting, str(e).split(": ", 1)[-1])
            return
        if hooks.on_built is not None:
            hooks.on_built(scaler)
        scaler.install_signal_handlers()
        try:
            await scaler.start()
        except BackendError as e:
            await scaler.stop()
            setting, _, msg = str(e).partition(": ")
            _fail(setting if msg else "backend", msg or setting)
        try:
            await scaler.run()
        finally:
            await scaler.stop()

    asyncio.run(main())


@app.command()
def simulate(
    source: Annotated[str, typer.Option(help="synthetic | trace")] = "synthetic",
    seed: Annotated[int, typer.Option()] = 1,
    symbols: Annotated[int, typer.Option(min=1)] = 500,
    trace: Annotated[Path | None, typer.Option(help="CSV of time, msgs/s")] = None,
    day: Annotated[
        str | None, typer.Option("--date", help="YYYY-MM-DD (default: a session)")
    ] = None,
    capacity: Annotated[float, typer.Option(help="msgs/s one handler sustains")] = 2500.0,
    partitions: Annotated[int, typer.Option(min=1)] = 12,
    min_handlers: Annotated[int, typer.Option()] = 1,
    max_handlers: Annotated[int, typer.Option()] = 12,
    lag_target: Annotated[float, typer.Option(help="seconds")] = 5.0,
    session_min: Annotated[str, typer.Option(help="e.g. open=8,close=4")] = "",
    lead: Annotated[float, typer.Option(help="pre-scale lead, seconds")] = 120.0,
    calendar: Annotated[str, typer.Option()] = "XNYS",
    json_out: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
    plot: Annotated[Path | None, typer.Option(help="write a PNG chart here")] = None,
    suite: Annotated[bool, typer.Option(help="every day shape, several seeds, one table")] = False,
    seeds: Annotated[int, typer.Option(min=1, help="--suite: seeds per day")] = 5,
    days: Annotated[str, typer.Option(help="--suite: comma-separated day names")] = "",
    workers: Annotated[int, typer.Option(min=1, help="--suite: processes")] = 2,
    backend: Annotated[str, typer.Option(help="whose measured pauses: process|docker|swarm")] = (
        "docker"
    ),
    capacity_error: Annotated[
        float, typer.Option(help="configured capacity off by this share, e.g. 0.3")
    ] = 0.0,
) -> None:
    """Backtest: a market day's message rate through our policy and the reactive baseline."""
    from scaler.calendar import CalendarError, SessionCalendar, parse_session_min
    from scaler.sim.pauses import BENCH_PAUSES
    from scaler.simulate import HandlerModel, backtest, recorded_day, synthetic_day

    if backend not in BENCH_PAUSES:
        _fail("--backend", f"expected one of {', '.join(BENCH_PAUSES)}, got {backend!r}")
    if not -0.9 <= capacity_error <= 3.0:
        _fail("--capacity-error", "expected a share between -0.9 and 3.0")
    model = HandlerModel(capacity, partitions, backend, capacity_error=capacity_error)
    if suite:
        _suite(model, seeds, days, workers, min_handlers, max_handlers, lag_target, json_out)
        return

    try:
        cal = SessionCalendar(calendar, parse_session_min(session_min), lead)
    except CalendarError as e:
        _fail("calendar", str(e))
        return
    except ValueError as e:
        _fail("session_min", str(e))
        return
    if min_handlers > max_handlers:
        _fail("min_handlers", f"--min-handlers ({min_handlers}) > --max-handlers ({max_handlers})")
    try:
        date = dt.date.fromisoformat(day) if day else cal.last_session()
    except ValueError as e:
        _fail("--date", str(e))
        return
    info = cal.day(date)
    if source == "synthetic":
        series = synthetic_day(date, close_s=info.close_s, symbols=symbols, seed=seed)
    elif source == "trace":
        if trace is None or not trace.exists():
            _fail("--trace", "an existing CSV file is required with --source trace")
            return
        try:
            series = recorded_day(trace, date, cal.tz)
        except ValueError as e:
            _fail("--trace", str(e))
            return
    else:
        _fail("--source", f"expected synthetic or trace, got {source!r}")
        return
    results = backtest(
        series, cal, model, min_handlers=min_handlers, max_handlers=max_handlers,
        lag_target_s=lag_target, keep_series=plot is not None,
    )  # fmt: skip
    summary = {"policies": {r.name: r.summary() for r in results}}
    if plot is not None:
        from scaler.simulate import plot as draw

        draw(series, results, plot, lag_target)
    if json_out:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"{series.source} on {date} ({len(series.rates):,} s, lag target {lag_target}s)"
    )
    t.add_column("metric")
    for r in results:
        t.add_column(r.name, justify="right")
    keys = ["handler_seconds", "lag_above_target_s", "peak_lag_s", "scale_events", "max_handlers"]
    for k in keys:
        t.add_row(k, *(str(r.summary()[k]) for r in results))
    Console().print(t)
    if plot is not None:
        Console().print(f"chart: {plot}")


def _suite(model: Any, seeds: int, days: str, workers: int, lo: int, hi: int, target: float,
           json_out: bool) -> None:  # fmt: skip
    from scaler.sim.days import SUITE
    from scaler.sim.suite import SuiteConfig, run_suite, table

    names = [d.strip() for d in days.split(",") if d.strip()]
    known = {d.name for d in SUITE}
    unknown = [n for n in names if n not in known]
    if unknown:
        _fail("--days", f"unknown day {unknown[0]!r} (one of {', '.join(sorted(known))})")
    if lo > hi:
        _fail("min_handlers", f"--min-handlers ({lo}) > --max-handlers ({hi})")
    cfg = SuiteConfig(
        seeds=tuple(range(1, seeds + 1)), min_handlers=lo, max_handlers=hi,
        lag_target_s=target, model=model, workers=workers,
    )  # fmt: skip
    chosen = [d for d in SUITE if not names or d.name in names]
    result = run_suite(cfg, chosen)
    if json_out:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return
    from rich.console import Console

    Console(width=200).print(table(result))
