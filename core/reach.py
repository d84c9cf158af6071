"""Reaching the broker at start: wait for it with backoff up to a deadline, then say what
is wrong in one line.

A process started while the broker is restarting (a rollout, a bounce, a stack whose
parts come up in any order) must ride that out rather than die: the broker's absence is a
failure of the infrastructure. A wrong address looks the same from here, so the wait is
bounded and its end names the address.

A missing topic is named at once to a command run by hand (a mistyped name), and waited
for, with the same bound, by a service: the job that makes the topics may still be
running when a handler starts with its broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from aiokafka.errors import KafkaError, KafkaTimeoutError

from core.retry import backoff_s
from core.topology import TopicMissing, partition_ids

log = logging.getLogger(__name__)

T = TypeVar("T")

_FIRST_RETRY_S = 0.25
_MAX_RETRY_S = 5.0


class BrokerUnreachable(Exception):
    """No broker at ``bootstrap`` answered within ``waited_s``."""

    def __init__(self, bootstrap: str, waited_s: float) -> None:
        self.where = f"--bootstrap {bootstrap}"
        self.what = (
            f"no broker answered within {waited_s:g} s (is it running, is the address right?)"
        )
        super().__init__(f"{self.where}: {self.what}")


@contextlib.contextmanager
def quiet(logger: logging.Logger) -> Iterator[None]:
    """Hold back a logger's lines: each failed connection attempt of the client is one,
    where the caller says once what is wrong."""
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unreached(e: BaseException) -> bool:
    """Whether ``e`` says no broker is there yet (or not reachable): worth another try."""
    if isinstance(e, KafkaError):
        return e.retriable or isinstance(e, KafkaTimeoutError)
    return isinstance(e, OSError | TimeoutError)


async def reach(
    bootstrap: str,
    connect_timeout_s: float,
    step: Callable[[], Awaitable[T]],
    wait_for_topics: bool = False,
) -> T:
    """``await step()`` (a first request to the broker at ``bootstrap``), retried with
    backoff while no broker answers, up to ``connect_timeout_s``; then BrokerUnreachable.

    With ``wait_for_topics``, a missing topic is waited for the same way and raised as
    TopicMissing at the deadline. Anything else ``step`` raises (a refusal, or a missing
    topic without ``wait_for_topics``) is raised at once.
    """
    deadline = time.monotonic() + connect_timeout_s
    attempt = 0
    while True:
        attempt += 1
        left = deadline - time.monotonic()
        try:
            # An address that swallows packets would hold one attempt for the client's
            # whole request timeout; the deadline is the caller's, so it bounds each one.
            with quiet(logging.getLogger("aiokafka")):
                async with asyncio.timeout(max(0.1, left)):
                    return await step()
        except TopicMissing as e:
            if not wait_for_topics or time.monotonic() >= deadline:
                raise
            what = f"no topic {e.topic} on {bootstrap} yet"
        except Exception as e:
            if not _unreached(e):
                raise
            if time.monotonic() >= deadline:
                raise BrokerUnreachable(bootstrap, connect_timeout_s) from None
            what = f"no broker at {bootstrap} yet ({type(e).__name__})"
        # The last attempt comes at the deadline itself.
        wait = min(backoff_s(attempt, _FIRST_RETRY_S, _MAX_RETRY_S), deadline - time.monotonic())
        log.warning(
            "%s; retry %d in %.1f s, giving up %g s after the start",
            what, attempt, max(0.0, wait), connect_timeout_s,
        )  # fmt: skip
        await asyncio.sleep(max(0.0, wait))


async def reach_topics(
    bootstrap: str, topics: list[str], connect_timeout_s: float, wait_for_topics: bool = False
) -> dict[str, list[int]]:
    """Each topic's partition ids, waiting up to ``connect_timeout_s`` for a broker (and
    with ``wait_for_topics``, for the topics too).

    Raises BrokerUnreachable when no broker answered in time, and
    ``core.topology.TopicMissing`` for a topic the broker does not have: at once, or at the
    deadline with ``wait_for_topics``.
    """
    step = functools.partial(partition_ids, bootstrap, topics)
    return await reach(bootstrap, connect_timeout_s, step, wait_for_topics)
