"""``tickscale scaler keda``: serve KEDA's external scaler interface with tickscale's policy."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import typer

from core.cli_settings import flag_of, load, options_from
from scaler.keda.settings import HANDLER_ONLY, KedaSettings


def _fail(setting: str, msg: str, invalid: bool = True) -> typer.Exit:
    field = KedaSettings.model_fields.get(setting)
    flag = flag_of(setting, field) if field is not None else setting
    typer.echo(f"error: {'invalid setting ' if invalid else ''}{flag}: {msg}", err=True)
    return typer.Exit(2)


@options_from(KedaSettings, exclude=HANDLER_ONLY)
def keda(ctx: typer.Context, given: dict[str, Any]) -> None:
    """Serve KEDA's external scaler (gRPC) with this scaler's policy.

    Kubernetes runs the handlers; a ScaledObject of type external asks here how many.
    Settings also come from TICKSCALE_SCALER_* variables; flags win."""
    s = load(KedaSettings, given, stop_handlers_on_exit=False)
    # gRPC's core logs its own errors to stderr (a failed bind, on two lines); this command
    # reports each failure once, naming the setting. GRPC_VERBOSITY=error shows them.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from core.http import CannotListen, PortInUse
    from scaler.app import StartupError
    from scaler.keda.app import build_keda

    async def main() -> None:
        ks = await build_keda(s)
        ks.scaler.install_signal_handlers()
        async with ks:
            await ks.run()

    try:
        asyncio.run(main())
    except StartupError as e:
        raise _fail(e.setting, str(e).split(": ", 1)[-1], e.invalid) from None
    except PortInUse as e:
        raise _fail("metrics_port", f"{e.host}:{e.port} is already in use") from None
    except CannotListen as e:
        raise _fail("metrics_host", e.strerror or str(e)) from None
