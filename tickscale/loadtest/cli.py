"""``tickscale loadtest`` (run one load test), ``tickscale loadtest --suite reliability`` (every
drill and bad input, one table) and ``tickscale loadtest compare A.json B.json``.

Exit status of a run: 0 when the ledger and every SLO check pass, 1 otherwise (also when the
run could not be carried out or was stopped early, with the reason), 2 for invalid options.
Of a suite: 0 when every case passes, 1 otherwise, 2 for invalid options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    help="Replay a market day through a running stack; check the ledger and the SLOs.",
    no_args_is_help=False,
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _bad(param: str, msg: str) -> typer.BadParameter:
    return typer.BadParameter(msg, param_hint=param)


@app.callback()
def run(
    ctx: typer.Context,
    scenario: Annotated[
        str, typer.Option(help="full-day | open | close | flash-burst | after-hours")
    ] = "open",
    target: Annotated[str, typer.Option(help="local | compose")] = "local",
    bootstrap: Annotated[
        str | None, typer.Option(help="Kafka HOST:PORT to use (default: start one / compose's)")
    ] = None,
    redis: Annotated[
        str | None, typer.Option(help="Redis URL to use (default: start one / compose's)")
    ] = None,
    compose_env: Annotated[Path, typer.Option(help="compose .env (target compose)")] = Path(
        "compose/.env"
    ),
    source: Annotated[str, typer.Option(help="synthetic | itch | jsonl")] = "synthetic",
    file: Annotated[Path | None, typer.Option(help="input file for itch/jsonl")] = None,
    symbols: Annotated[
        int | None, typer.Option(min=1, help="synthetic: instruments (default: scenario's)")
    ] = None,
    only: Annotated[
        str | None,
        typer.Option(
            help="only these symbols, comma-separated (any source; market-wide kept); "
            "with --suite: only these cases"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="synthetic: the day's seed")] = 1,
    day: Annotated[str | None, typer.Option("--date", help="trading date YYYY-MM-DD")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="start HH:MM (exchange time)")] = None,
    to: Annotated[str | None, typer.Option("--to", help="end HH:MM (exchange time)")] = None,
    speed: Annotated[
        str | None, typer.Option(help="replay speed: number or max (default: scenario's)")
    ] = None,
    burst_at: Annotated[str, typer.Option(help="flash-burst: when it starts")] = "09:30",
    burst_multiple: Annotated[
        float, typer.Option(help="flash-burst: multiple of the base speed (peak rate)")
    ] = 3.0,
    burst_seconds: Annotated[float, typer.Option(help="flash-burst: wall seconds")] = 20.0,
    malformed_every: Annotated[
        int, typer.Option(min=0, help="inject a malformed message after every N")
    ] = 0,
    partitions: Annotated[int, typer.Option(min=1, help="partitions of the run's topics")] = 6,
    policy: Annotated[str, typer.Option(help="tickscale | reactive | fixed:N")] = "tickscale",
    min_handlers: Annotated[int, typer.Option(min=0, help="the scaler's minimum")] = 1,
    max_handlers: Annotated[int, typer.Option(min=1, help="the scaler's maximum")] = 4,
    session_min: Annotated[
        str, typer.Option(help="tickscale policy: per-session floor")
    ] = "open=4,close=3",
    lead: Annotated[float, typer.Option(help="tickscale policy: pre-scale lead, wall s")] = 5.0,
    lag_target: Annotated[float, typer.Option(help="the scaler's lag target, s")] = 5.0,
    scale_down_window: Annotated[
        float, typer.Option(help="the scaler's scale-down window, s")
    ] = 30.0,
    chaos: Annotated[
        list[str] | None,
        typer.Option(
            help="KIND@SECONDS[:DURATION], repeatable; kill-handler, scale-in, kill-scaler, "
            "broker-restart, broker-kill, broker-pause, redis-stop, redis-kill (duration "
            "default 60 for broker-restart and redis-stop, 10 for the others)"
        ),
    ] = None,
    rollout: Annotated[
        str | None,
        typer.Option(
            help="VERSION@SECONDS: a handler rollout then (local: a command line; compose: an "
            "image the gate admits); see docs/rollout.md"
        ),
    ] = None,
    rollout_guard: Annotated[str, typer.Option(help="--rollout's guard, key=value,...")] = "",
    slo_p50: Annotated[float, typer.Option(help="latency p50 limit, s (0 = off)")] = 1.0,
    slo_p99: Annotated[float, typer.Option(help="latency p99 limit, s (0 = off)")] = 5.0,
    slo_max: Annotated[float, typer.Option(help="latency max limit, s (0 = off)")] = 30.0,
    slo_lag_p99: Annotated[float, typer.Option(help="lag p99 limit, s (0 = off)")] = 5.0,
    slo_lag_max: Annotated[float, typer.Option(help="lag max limit, s (0 = off)")] = 30.0,
    slo_recovery: Annotated[float, typer.Option(help="recovery limit, s (0 = off)")] = 60.0,
    out: Annotated[
        Path | None, typer.Option(help="output directory (default .local/loadtest/<run>)")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write results here")] = None,
    drain_timeout: Annotated[float, typer.Option(help="wait for the group to drain, s")] = 300.0,
    progress: Annotated[bool, typer.Option(help="live progress")] = True,
    keep_topics: Annotated[bool, typer.Option(help="keep the run's topics")] = False,
    no_members_timeout: Annotated[
        float,
        typer.Option(help="stop the run when the group has no members this long, s (0 = off)"),
    ] = 30.0,
    suite: Annotated[
        str | None,
        typer.Option(help="run a suite instead (reliability: every drill and bad input)"),
    ] = None,
) -> None:
    """Run one load test (see ``tickscale.loadtest.scenarios`` for the scenarios)."""
    if ctx.invoked_subcommand is not None:
        return
    if suite is not None:
        if chaos:
            raise _bad("--chaos", "not with --suite: each of the suite's cases sets its own")
        _run_suite(suite, only, out, json_out)
        return
    from core.runtime import sigterm_and_sighup_as_ctrl_c
    from tickscale.loadtest.chaos import check_options, parse_chaos
    from tickscale.loadtest.runner import LoadTestConfig, RunError, parse_policy, run_loadtest
    from tickscale.loadtest.scenarios import resolve
    from tickscale.loadtest.slo import Thresholds

    try:
        plan = resolve(
            scenario, source=source, file=file, symbols=symbols, seed=seed, date=day,
            start=from_, end=to, speed=speed, burst_at=burst_at, burst_multiple=burst_multiple,
            burst_seconds=burst_seconds, malformed_every=malformed_every, only=only,
        )  # fmt: skip
    except ValueError as e:
        opt, _, msg = str(e).partition(": ")
        raise _bad(opt if msg else "--scenario", msg or opt) from None
    if source in ("itch", "jsonl") and (file is None or not file.exists()):
        raise _bad("--file", f"an existing file is required with --source {source}")
    if source not in ("synthetic", "itch", "jsonl"):
        raise _bad("--source", "expected synthetic, itch or jsonl")
    if source != "jsonl":
        from ingest.codecs.errors import SourceError
        from ingest.replay.spec import resolve_day

        try:
            resolve_day(day)  # a holiday or a malformed date fails here, not in the feed
        except SourceError as e:
            raise _bad(e.where, e.what) from None
    if target not in ("local", "compose"):
        raise _bad("--target", "expected local or compose")
    try:
        pol = parse_policy(policy, min_handlers, max_handlers)
    except ValueError as e:
        raise _bad("--policy", str(e).split(": ", 1)[-1]) from None
    if pol.min_handlers > pol.max_handlers:
        raise _bad("--min-handlers", f"{min_handlers} > --max-handlers {max_handlers}")
    try:
        specs = [parse_chaos(c) for c in chaos or []]
        check_options(specs, target, bootstrap, redis, pol.name)
    except ValueError as e:
        raise _bad("--chaos", str(e)) from None
    plan_rollout = _rollout_plan(rollout, target, rollout_guard) if rollout else None
    cfg = LoadTestConfig(
        plan=plan, policy=pol, target=target, bootstrap=bootstrap, redis_url=redis,
        compose_env=compose_env, partitions=partitions, session_min=session_min, lead_s=lead,
        lag_target_s=lag_target, scale_down_window_s=scale_down_window, chaos=specs,
        thresholds=Thresholds(slo_p50, slo_p99, slo_max, slo_lag_p99, slo_lag_max, slo_recovery),
        out_dir=out, json_path=json_out, drain_timeout_s=drain_timeout, progress=progress,
        keep_topics=keep_topics, no_members_s=no_members_timeout, rollout=plan_rollout,
    )  # fmt: skip
    console = Console(stderr=True)
    # A CI job's timeout or a closed terminal must not leave the run's stack behind.
    sigterm_and_sighup_as_ctrl_c()
    try:
        rc, _ = run_loadtest(cfg, console)
    except (RunError, RuntimeError, TimeoutError, OSError) as e:
        # Set-up failures (broker not starting, compose stack absent) are findings, not bugs.
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None
    raise typer.Exit(rc)


def _rollout_plan(text: str, target: str, guard: str) -> Any:
    from scaler.guard import GuardConfig, GuardError
    from tickscale.loadtest.rollout_drill import parse_rollout

    try:
        GuardConfig.parse(guard)
    except GuardError as e:
        raise _bad("--rollout-guard", str(e)) from None
    try:
        return parse_rollout(text, target, guard)
    except ValueError as e:
        raise _bad("--rollout", str(e)) from None


def _run_suite(name: str, only: str | None, out: Path | None, json_out: Path | None) -> None:
    """``--suite NAME [--only CASE,...]``: the suite's own short runs on its own local stack."""
    import sys
    import time

    from core.runtime import sigterm_and_sighup_as_ctrl_c
    from tickscale.loadtest.suite import cases_of, run_suite, select

    try:
        cases = select(cases_of(name), only)
    except ValueError as e:
        raise _bad("--suite" if "suite" in str(e) else "--only", str(e)) from None
    # A CI log is no terminal and rich would fold the table into 80 columns.
    console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)
    sigterm_and_sighup_as_ctrl_c()
    out_dir = out or Path(".local/loadtest") / f"suite-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        rc, _ = run_suite(name, cases, out_dir, console, json_out)
    except (RuntimeError, TimeoutError, OSError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None
    raise typer.Exit(rc)


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="results JSON of run A (--json)")],
    b: Annotated[Path, typer.Argument(help="results JSON of run B")],
) -> None:
    """Two runs side by side: ledger, latency, lag, recovery, handler-seconds."""
    from tickscale.loadtest.compare import print_comparison
    from tickscale.loadtest.results import load

    try:
        ra, rb = load(a), load(b)
    except (OSError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    print_comparison(ra, rb, a.name, b.name, Console())
