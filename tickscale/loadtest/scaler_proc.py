"""``tickscale scaler`` as the load test runs it: the same command, plus a scale-in trigger.

``python -m tickscale.loadtest.scaler_proc <the flags of tickscale scaler>``

The scale-in drill needs the scaler itself to remove a handler while load flows, through its
own decision path and backend (SIGTERM, the handler drains and commits, leaves the group; an
audit event records it), at a moment the load test picks. Restarting the scaler with a lower
``--max-handlers`` would be the way with a container backend, which adopts the handlers it
finds; the process backend cannot: its handlers are its children and stop with it, so a
restart is a fleet restart, not a scale-in.

So on SIGUSR1 this process lowers the running policy's maximum to one below the number of
handlers it runs: what that restart would have configured. The policy then removes one by its
ordinary rules, i.e. once the lower count has held for its scale-down window
(``--scale-down-window``) and the last change is ``scale_down_interval_s`` old. The maximum
stays lowered for the rest of the run, as it would after a restart. Everything else is the
unmodified command, settings and code of ``tickscale scaler``: the trigger goes in through the
command's explicit hook (``scaler.cli.Hooks``), not by replacing any of its code.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scaler.service import Scaler

log = logging.getLogger("scaler.loadtest")


async def lower_max(sc: Scaler) -> int | None:
    """Set the policy's maximum to one below the running count; the new maximum, or None."""
    from scaler.policy import Policy

    policy = sc.decider
    if not isinstance(policy, Policy):
        log.warning("scale-in drill: policy %s has no maximum to lower", policy.name)
        return None
    running = len(await sc.backend.list())
    if running <= 1:
        log.warning("scale-in drill: %d handler(s) running, none to remove", running)
        return None
    new_max = running - 1
    policy.cfg = replace(
        policy.cfg, max_handlers=new_max, min_handlers=min(policy.cfg.min_handlers, new_max)
    )
    log.info("scale-in drill: max handlers lowered to %d (%d running)", new_max, running)
    return new_max


def main() -> None:
    from core.client_log import CLIENT_REPEATS
    from scaler.cli import Hooks
    from scaler.cli import main as run_scaler

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        # An outage's client errors: each kind once, then one line a minute.
        handlers=[CLIENT_REPEATS.handler(sys.stderr)],
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    tasks: set[asyncio.Task[int | None]] = set()

    def on_built(sc: Scaler) -> None:
        def on_usr1() -> None:
            t = asyncio.ensure_future(lower_max(sc))
            tasks.add(t)  # keep a reference until it is done
            t.add_done_callback(tasks.discard)

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, on_usr1)

    run_scaler(Hooks(on_built=on_built))


if __name__ == "__main__":
    main()
