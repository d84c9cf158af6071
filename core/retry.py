"""Retries for infrastructure failures: one backoff schedule, capped and jittered.

Every loop that rides out a broker, Redis or engine failure goes through here, on tenacity,
so what is retried, how often and how long it waits are said once per caller instead of being
hand-rolled again each time. The jitter keeps handlers that failed together (a broker
restart fails a whole fleet at once) from retrying in lockstep.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
)

T = TypeVar("T")


def backoff_s(n: int, first_s: float, max_s: float) -> float:
    """The wait before the ``n``-th retry (n >= 1): ``first_s`` doubling each time, up to a
    tenth more at random, never above ``max_s``."""
    base = first_s * 2 ** (n - 1)
    return min(max_s, base + random.uniform(0, 0.1 * base))


def _wait(first_s: float, max_s: float) -> Callable[[RetryCallState], float]:
    return lambda rs: backoff_s(rs.attempt_number, first_s, max_s)


def _warn(log: logging.Logger, what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(rs: RetryCallState) -> None:
        e = rs.outcome.exception() if rs.outcome is not None else None
        log.warning("cannot %s (%r), retry %d", what, e, rs.attempt_number)

    return before_sleep


async def retry_async(
    step: Callable[[], Awaitable[T]],
    *,
    what: str,
    attempts: int,
    first_s: float,
    max_s: float,
    retry_on: Callable[[BaseException], bool],
    sleep: Callable[[float], Awaitable[None]],
    log: logging.Logger,
) -> T:
    """``await step()`` until it returns; a failure ``retry_on`` accepts is logged and retried
    after the backoff, up to ``attempts`` tries in all. Anything else, or the last failure,
    is raised as it came. ``sleep`` lets a caller cut the waits short (e.g. on a stop)."""
    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=_wait(first_s, max_s),
        retry=retry_if_exception(retry_on),
        sleep=sleep,
        before_sleep=_warn(log, what),
        reraise=True,
    ):
        with attempt:
            return await step()
    raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover


def retry_sync(
    step: Callable[[], T],
    *,
    what: str,
    attempts: int,
    first_s: float,
    max_s: float,
    retry_on: Callable[[BaseException], bool],
    log: logging.Logger,
) -> T:
    """``retry_async`` for blocking code (e.g. a Docker engine call in a worker thread)."""
    for attempt in Retrying(
        stop=stop_after_attempt(attempts),
        wait=_wait(first_s, max_s),
        retry=retry_if_exception(retry_on),
        before_sleep=_warn(log, what),
        reraise=True,
    ):
        with attempt:
            return step()
    raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover
