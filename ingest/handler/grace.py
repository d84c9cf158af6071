"""How long a stopping handler has left, and what it gives up when time runs out.

A stop ends within ``stop_grace_s`` whatever the handler is doing: the batch in
flight gets part of the grace to commit (else it is abandoned and its
transaction aborted), and each closing step gets what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable

log = logging.getLogger(__name__)

# The share of the grace the batch in flight gets to commit; the rest is for
# saving snapshots, leaving the group and closing the clients.
BATCH_SHARE = 0.4


class StopGrace:
    """The stop request of one handler: the event, its deadline and the watchdog
    that abandons a batch still in flight."""

    def __init__(self, grace_s: float, handler_id: str) -> None:
        self.grace_s = grace_s
        self.handler_id = handler_id
        self.event = asyncio.Event()
        self.abandoned = False  # the batch in flight was given up
        self.run_task: asyncio.Task[None] | None = None  # the consume loop, while it runs
        self._deadline: float | None = None  # monotonic; set by the first request
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def request(self) -> None:
        """Start stopping: everything is closed ``grace_s`` from now at the latest."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self.grace_s
            task = self.run_task
            if task is not None and not task.done():
                self._watchdog = asyncio.get_running_loop().call_later(
                    BATCH_SHARE * self.grace_s, self._abandon_batch
                )
        self.event.set()

    def loop_ended(self) -> None:
        """The consume loop returned: nothing is left for the watchdog to abandon."""
        self.run_task = None
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _abandon_batch(self) -> None:
        task = self.run_task
        if task is not None and not task.done():
            log.warning(
                "handler %s: the batch in flight did not finish within %.1fs of the stop; "
                "abandoning it (its transaction is aborted)",
                self.handler_id,
                BATCH_SHARE * self.grace_s,
            )
            self.abandoned = True
            task.cancel()

    def left(self) -> float:
        """Seconds left of the grace (all of it before a stop is requested)."""
        if self._deadline is None:
            return self.grace_s
        return max(0.0, self._deadline - time.monotonic())

    async def bounded(
        self, what: str, step: Awaitable[object], *tolerated: type[BaseException]
    ) -> None:
        """One closing step, given what is left of the grace (one second at least:
        a skipped close leaves more behind than a slightly late one)."""
        try:
            async with asyncio.timeout(max(1.0, self.left())):
                await step
        except TimeoutError:
            log.warning("stop: could not %s within the stop grace; skipped", what)
        except tolerated as e:
            log.warning("stop: could not %s (%r)", what, e)

    async def pause(self, seconds: float) -> None:
        """Sleep, unless or until a stop is requested."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), seconds)
