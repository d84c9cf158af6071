"""``tickscale loadtest`` (run one load test), ``tickscale loadtest --suite reliability`` (every
drill and bad input, one table) and ``tickscale loadtest compare A.json B.json``.

Exit status of a run: 0 when the ledger and every SLO check pass, 1 otherwise (also when the
run could not be carried out or was stopped early, with the reason), 2 for invalid options.
Of a suite: 0 when every case passes, 1 otherwise, 2 for invalid options.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from core.cli_errors import OneLineErrors
from core.cli_settings import load, options_from
from tickscale.loadtest.settings import LoadTestSettings

if TYPE_CHECKING:
    from tickscale.loadtest.runner import LoadTestConfig

app = typer.Typer(
    help="Replay a market day through a running stack; check the ledger and the SLOs.",
    no_args_is_help=False,
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    cls=OneLineErrors,
)


def _finish(call: Callable[[], int], console: Console, *also: type[Exception]) -> NoReturn:
    """Exit with the run's status. Set-up failures (a broker not starting, a compose stack
    absent) are findings, not bugs: one line and status 1; a --bootstrap where no broker
    answered is the input's, status 2; Ctrl-C is status 130."""
    from core.reach import BrokerUnreachable

    failures: tuple[type[Exception], ...] = (RuntimeError, TimeoutError, OSError, *also)
    try:
        rc = call()
    except BrokerUnreachable as e:  # the address given, as every command names it
        console.print(f"[red]error:[/] {e.where}: {e.what}", soft_wrap=True)
        raise typer.Exit(2) from None
    except failures as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None
    raise typer.Exit(rc)


def _bad(param: str, msg: str) -> typer.BadParameter:
    return typer.BadParameter(msg, param_hint=param)


@app.callback()
@options_from(LoadTestSettings)
def run(ctx: typer.Context, given: dict[str, Any]) -> None:
    """Run one load test (see ``tickscale.loadtest.scenarios`` for the scenarios; settings
    also from TICKSCALE_LOADTEST_* variables; flags win)."""
    if ctx.invoked_subcommand is not None:
        return
    s = load(LoadTestSettings, given)
    if s.suite is not None:
        if s.chaos:
            raise _bad("--chaos", "not with --suite: each of the suite's cases sets its own")
        _run_suite(s.suite, s.only, s.out, s.json_out)
        return
    from core.runtime import sigterm_and_sighup_as_ctrl_c
    from tickscale.loadtest.runner import RunError, run_loadtest

    cfg = _config(s)
    console = Console(stderr=True)
    # A CI job's timeout or a closed terminal must not leave the run's stack behind.
    sigterm_and_sighup_as_ctrl_c()
    _finish(lambda: run_loadtest(cfg, console)[0], console, RunError)


def _check_source(s: LoadTestSettings) -> None:
    if s.source in ("itch", "jsonl") and (s.file is None or not s.file.exists()):
        raise _bad("--file", f"an existing file is required with --source {s.source}")
    if s.source not in ("synthetic", "itch", "jsonl"):
        raise _bad("--source", "expected synthetic, itch or jsonl")
    if s.source != "jsonl":
        from ingest.codecs.errors import SourceError
        from ingest.replay.spec import resolve_day

        try:
            resolve_day(s.day)  # a holiday or a malformed date fails here, not in the feed
        except SourceError as e:
            raise _bad(e.where, e.what) from None


def _config(s: LoadTestSettings) -> LoadTestConfig:
    """The run the settings describe; typer.BadParameter naming the option if it cannot be."""
    from tickscale.loadtest.chaos import check_options, parse_chaos
    from tickscale.loadtest.runner import LoadTestConfig, parse_policy
    from tickscale.loadtest.scenarios import resolve

    try:
        plan = resolve(s.scenario, s.plan_options())
    except ValueError as e:
        opt, _, msg = str(e).partition(": ")
        raise _bad(opt if msg else "--scenario", msg or opt) from None
    _check_source(s)
    try:
        pol = parse_policy(s.policy, s.min_handlers, s.max_handlers)
    except ValueError as e:
        raise _bad("--policy", str(e).split(": ", 1)[-1]) from None
    if pol.min_handlers > pol.max_handlers:
        raise _bad("--min-handlers", f"{s.min_handlers} > --max-handlers {s.max_handlers}")
    try:
        specs = [parse_chaos(c) for c in s.chaos]
        check_options(specs, s.target, s.bootstrap, s.redis_url, pol.name)
    except ValueError as e:
        raise _bad("--chaos", str(e)) from None
    return LoadTestConfig(
        plan=plan, policy=pol, target=s.target, bootstrap=s.bootstrap, redis_url=s.redis_url,
        compose_env=s.compose_env, partitions=s.partitions, session_min=s.session_min,
        lead_s=s.lead_s, lag_target_s=s.lag_target_s, scale_down_window_s=s.scale_down_window_s,
        chaos=specs, thresholds=s.thresholds(), out_dir=s.out, json_path=s.json_out,
        drain_timeout_s=s.drain_timeout_s, connect_timeout_s=s.connect_timeout_s,
        progress=s.progress, keep_topics=s.keep_topics,
        no_members_s=s.no_members_timeout_s, rollout=_rollout_plan(s),
    )  # fmt: skip


def _rollout_plan(s: LoadTestSettings) -> Any:
    """The run's rollout (``--rollout``), or None."""
    if not s.rollout:
        return None
    from scaler.guard import GuardConfig, GuardError
    from tickscale.loadtest.rollout_drill import parse_rollout

    try:
        GuardConfig.parse(s.rollout_guard)
    except GuardError as e:
        raise _bad("--rollout-guard", str(e)) from None
    try:
        return parse_rollout(s.rollout, s.target, s.rollout_guard)
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
    _finish(lambda: run_suite(name, cases, out_dir, console, json_out)[0], console)


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="results JSON of run A (--json)")],
    b: Annotated[Path, typer.Argument(help="results JSON of run B")],
) -> None:
    """Two runs side by side: ledger, latency, lag, recovery, handler-seconds."""
    import orjson

    from tickscale.loadtest.compare import print_comparison
    from tickscale.loadtest.results import load

    runs = []
    for path in (a, b):
        try:
            runs.append(load(path))
        except OSError as e:
            typer.echo(f"error: {path}: {e.strerror or e}", err=True)
            raise typer.Exit(2) from None
        except orjson.JSONDecodeError as e:
            typer.echo(f"error: {path}: not JSON ({e}); give a load test's --json file", err=True)
            raise typer.Exit(2) from None
        except ValueError as e:
            typer.echo(f"error: {path}: {str(e).removeprefix(f'{path} ')}", err=True)
            raise typer.Exit(2) from None
    ra, rb = runs
    print_comparison(ra, rb, a.name, b.name, Console())
