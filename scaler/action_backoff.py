"""A backend action that failed is tried again after a backoff, not at every poll.

The policy asks for the same change at each poll once its settle period has passed (5 s
by default), so a backend that keeps failing (a full disk under the process backend, an
engine refusing) was retried 720 times an hour, each time with an ERROR line, a started
and stopped handler and an audit record. A failure of the infrastructure is retried with
backoff: the same action waits, doubling up to a minute, and its failures are said once,
then once a minute, then when it succeeds again. Another action (a scale-down after a
failed scale-up) is not held.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from core.repeats import RepeatedFailure
from core.retry import backoff_s
from scaler.backends.base import BackendError

FIRST_S = 2.0
MAX_S = 60.0


class ActionBackoff:
    """Which backend action waits out its backoff, and what its failures say."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._failing = RepeatedFailure(logger, "backend action", clock=clock)
        self._failures = 0  # in a row, of ``_op``
        self._op = ""
        self._until = 0.0

    def holds(self, op: str) -> bool:
        """Whether ``op`` failed last and its backoff has not passed yet."""
        return op == self._op and self.clock() < self._until

    def failed(self, op: str, n: int, error: BackendError) -> float:
        """Count a failure of ``op`` (for ``n`` handlers); the seconds it is held for."""
        if op != self._op:
            self._op, self._failures = op, 0
        self._failures += 1
        wait = backoff_s(self._failures, FIRST_S, MAX_S)
        self._until = self.clock() + wait
        self._failing.failed(BackendError(f"{op}({n}): {error}"))
        return wait

    def succeeded(self) -> None:
        self._op, self._failures, self._until = "", 0, 0.0
        self._failing.succeeded()
