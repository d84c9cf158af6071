"""``tickscale scaler`` (run the scaler) and ``tickscale scaler simulate`` (policy backtest)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

from core.cli_errors import OneLineErrors
from core.cli_settings import flag_of, load, options_from
from scaler.settings import ScalerSettings

if TYPE_CHECKING:
    from scaler.service import Scaler

app = typer.Typer(
    help="Autoscale the feed handlers on lag, rate and the trading calendar.",
    no_args_is_help=False,
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    cls=OneLineErrors,
)


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


def _fail(setting: str, msg: str, invalid: bool = True) -> None:
    field = ScalerSettings.model_fields.get(setting)
    flag = flag_of(setting, field) if field is not None else setting
    typer.echo(f"error: {'invalid setting ' if invalid else ''}{flag}: {msg}", err=True)
    raise typer.Exit(2)


@app.callback()
@options_from(ScalerSettings)
def run(ctx: typer.Context, given: dict[str, Any]) -> None:
    """Run the scaler (settings also from TICKSCALE_SCALER_* variables; flags win)."""
    if ctx.invoked_subcommand is not None:
        if given:  # the subcommand would run without them
            name = next(iter(given))
            flag = flag_of(name, ScalerSettings.model_fields[name])
            typer.echo(
                f"error: {flag} goes after the subcommand: tickscale scaler "
                f"{ctx.invoked_subcommand} {flag} ...", err=True,
            )  # fmt: skip
            raise typer.Exit(2)
        return
    # Mounted under `tickscale`, nothing sets a context object: no hooks.
    hooks = ctx.obj if isinstance(ctx.obj, Hooks) else Hooks()
    s = load(ScalerSettings, given)
    from core.http import CannotListen, PortInUse
    from scaler.app import StartupError, build
    from scaler.backends.base import BackendError, BackendUnreachable

    async def main() -> None:
        try:
            scaler = await build(s)
        except StartupError as e:
            _fail(e.setting, str(e).split(": ", 1)[-1], e.invalid)
            return
        if hooks.on_built is not None:
            hooks.on_built(scaler)
        scaler.install_signal_handlers()
        try:
            await scaler.start()
        except BackendError as e:
            await scaler.stop()
            setting, _, msg = str(e).partition(": ")
            # Nothing answered there (after the wait): the address may be right, the engine down.
            _fail(
                setting if msg else "backend", msg or setting, not isinstance(e, BackendUnreachable)
            )
        except PortInUse as e:
            await scaler.stop()
            _fail("metrics_port", f"{e.host}:{e.port} is already in use (another scaler on "
                  "this machine?); choose a free one", invalid=False)  # fmt: skip
        except CannotListen as e:
            await scaler.stop()
            _fail("metrics_host", e.strerror or str(e), invalid=False)
        try:
            await scaler.run()
        finally:
            await scaler.stop()

    asyncio.run(main())


# The backtest lives with the simulator; mounted here so it is `tickscale scaler simulate`.
from scaler.sim.cli import simulate  # noqa: E402

app.command()(simulate)
# KEDA's external scaler: the same policy, reported to Kubernetes instead of applied.
from scaler.keda.cli import keda  # noqa: E402

app.command()(keda)
