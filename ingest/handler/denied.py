"""Commits the broker refuses to this handler's principal: a grant missing, not a fault.

A handler whose principal may not write the ticks or dead-letter topic, use its
transactional id or commit in its group fails every commit the same way until an
operator changes the grants. Before, it aborted, restored and tried again every few
seconds without end, three lines each time and none saying what to fix. Now the refusal
is said once a minute with what to grant, the handler is not ready, and it tries again
on a slower backoff (to a minute), so the grant takes effect within a minute of being
made. Nothing is committed meanwhile, so the input is held; nothing is dead-lettered,
since no record is at fault (ingest.handler.poison).
"""

from __future__ import annotations

import logging
import time

from aiokafka.errors import (
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from core.retry import backoff_s

log = logging.getLogger(__name__)

DENIED = (
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    GroupAuthorizationFailedError,
)
_SAID_EVERY_S = 60.0
_FIRST_S = 2.0
_MAX_S = 60.0


def _what(e: BaseException) -> str:
    if isinstance(e, TopicAuthorizationFailedError):
        topics = e.args[0] if e.args and isinstance(e.args[0], set | frozenset) else e.args
        return f"Write and Describe on topic {', '.join(sorted(map(str, topics)))}"
    if isinstance(e, TransactionalIdAuthorizationFailed):
        return "Write and Describe on its transactional id (prefix tickscale.<group>.)"
    return "Read and Describe on its consumer group"


class Denials:
    """Says and paces commits refused for want of a grant."""

    def __init__(self) -> None:
        self._said_at: float | None = None  # when the refusal was last said; None: none
        self._since = 0.0

    @property
    def denied(self) -> bool:
        return self._said_at is not None

    def failed(self, e: BaseException) -> bool:
        """Take a failed commit's error; whether it was a refusal (said once a minute)."""
        if not isinstance(e, DENIED):
            return False
        now = time.monotonic()
        if self._said_at is None:
            self._since = now
        if self._said_at is None or now - self._said_at >= _SAID_EVERY_S:
            self._said_at = now
            log.error(
                "the broker refuses this handler's commits (%r): its principal needs %s "
                "(docs/security.md); the handler holds its input, commits nothing and tries "
                "again at most a minute apart", e, _what(e),
            )  # fmt: skip
        return True

    def wait_s(self, failures: int) -> float:
        """The wait before the next attempt after ``failures`` refused commits in a row."""
        return backoff_s(failures, _FIRST_S, _MAX_S)

    def succeeded(self) -> None:
        if self._said_at is None:
            return
        log.warning(
            "the broker takes this handler's commits again, after %.0f s refused",
            time.monotonic() - self._since,
        )
        self._said_at = None
