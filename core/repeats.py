"""A failure that repeats every cycle of a loop: said once, then once a minute, then its end.

A loop that retries each second (the scaler's poll) and logs each failure writes 3,600
identical lines an hour while its broker's topic is gone or Redis is down; the one line
an operator needs drowns. This says the first failure at once, a new kind of failure at
once, a reminder with the count once a minute while it lasts, and one line when the loop
succeeds again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


def describe(error: BaseException) -> str:
    """``Type: message``, whether or not the library's own str() names the type."""
    kind, text = type(error).__name__, str(error)
    return text if text.startswith(kind) else f"{kind}: {text}" if text else kind


class RepeatedFailure:
    """Reports one loop's failures to ``logger``; ``what`` names the loop's work ("poll").

    :param every_s: the reminder's interval while the same kind of failure lasts.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.what = what
        self.every_s = every_s
        self.clock = clock
        self._since: float | None = None  # when the run of failures began
        self._failures = 0  # in this run
        self._kind = ""  # the kind last said (the exception's class)
        self._said_at = 0.0
        self._unsaid = 0  # failures since the last line

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException) -> None:
        now = self.clock()
        if self._since is None:
            self._since = now
        self._failures += 1
        kind = type(error).__name__
        if kind != self._kind:
            self._kind = kind
            self._say(now, "%s failed: %s", describe(error))
            return
        self._unsaid += 1
        if now - self._said_at >= self.every_s:
            self._say(
                now, "%s still failing (%d times in the last %.0f s): %s",
                self._unsaid, now - self._said_at, describe(error),
            )  # fmt: skip

    def succeeded(self) -> None:
        if self._since is None:
            return
        self.logger.info(
            "%s succeeds again, after %d failures over %.0f s",
            self.what, self._failures, self.clock() - self._since,
        )  # fmt: skip
        self._since = None
        self._failures = 0
        self._kind = ""
        self._unsaid = 0

    def _say(self, now: float, fmt: str, *args: object) -> None:
        self.logger.warning(fmt, self.what, *args)
        self._said_at = now
        self._unsaid = 0
