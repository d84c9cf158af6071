"""Reaching the broker (and Redis) at start: wait for it with backoff up to a deadline, then
say what is wrong in one line.

A process started while the broker is restarting (a rollout, a bounce, a stack whose
parts come up in any order) must ride that out rather than die: the broker's absence is a
failure of the infrastructure. A wrong address looks the same from here, so the wait is
bounded and its end names the address.

A broker lost in the middle of a run that reads to a conclusion (``tickscale verify``) is
the same failure: ``Outage`` waits for it on the same schedule, bounded by its own
setting, and BrokerLost says that nothing was concluded rather than let a read cut short
pass for the topic's content.

A missing topic is named at once to a command run by hand (a mistyped name), and waited
for, with the same bound, by a service: the job that makes the topics may still be
running when a handler starts with its broker.

The scaler cannot work without its Redis (its lease, its audit), and waits for it the same
way (``reach_redis``); the handlers only cache there and start without it. Its container
engine is waited for the same way too (``keep_trying``, used by the engine backends).
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
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import AuthorizationError as RedisAuthorizationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


class BrokerLost(Exception):
    """The broker at ``bootstrap`` stopped answering mid-run and did not come back within
    ``waited_s``: nothing can be concluded from what was read (an infrastructure failure,
    not the input's)."""

    def __init__(self, bootstrap: str, waited_s: float, doing: str, setting: str) -> None:
        self.where = f"--bootstrap {bootstrap}"
        self.what = (
            f"the broker went away while {doing} and did not answer for {waited_s:g} s "
            f"({setting}); nothing was concluded: run it again once the broker is back"
        )
        super().__init__(f"{self.where}: {self.what}")


class Outage:
    """A broker's absence in the middle of a run: from the first request that goes
    unanswered to the next answer.

    The caller says what it was doing and which of its settings holds ``limit_s``; each
    failed probe warns once and comes back with the wait before the next one, until the
    absence has lasted ``limit_s``: then BrokerLost.
    While the broker is away the client's own lines (one per failed connection attempt)
    are held back. Use it as a context manager so they come back whatever happens.
    """

    def __init__(self, bootstrap: str, limit_s: float, doing: str, setting: str) -> None:
        self.bootstrap = bootstrap
        self.limit_s = limit_s
        self.doing = doing
        self.setting = setting
        self.since: float | None = None
        self.attempt = 0
        self._client_log = logging.getLogger("aiokafka")
        self._level: int | None = None

    def __enter__(self) -> Outage:
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore_client_log()

    def failed(self, e: BaseException, asked_at: float) -> float:
        """The probe sent at ``asked_at`` (monotonic) went unanswered: the wait before the
        next (BrokerLost past the limit). The absence counts from the first such probe."""
        now = time.monotonic()
        if self.since is None:
            self.since = asked_at
            self._level = self._client_log.level
            self._client_log.setLevel(logging.CRITICAL)
        self.attempt += 1
        gone = now - self.since
        if gone >= self.limit_s:
            raise BrokerLost(self.bootstrap, self.limit_s, self.doing, self.setting)
        wait = min(backoff_s(self.attempt, _FIRST_RETRY_S, _MAX_RETRY_S), self.limit_s - gone)
        log.warning(
            "no answer from the broker at %s while %s (%s) for %.1f s; retry %d in %.1f s, "
            "giving up after %g s",
            self.bootstrap, self.doing, type(e).__name__, gone, self.attempt, wait, self.limit_s,
        )  # fmt: skip
        return wait

    def answered(self) -> float:
        """The broker answered: how long it had been away (0.0 if it never was)."""
        if self.since is None:
            return 0.0
        gone = time.monotonic() - self.since
        log.warning(
            "the broker at %s is back after %.1f s; %s goes on", self.bootstrap, gone, self.doing
        )
        self.since = None
        self.attempt = 0
        self._restore_client_log()
        return gone

    def _restore_client_log(self) -> None:
        if self._level is not None:
            self._client_log.setLevel(self._level)
            self._level = None


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


async def keep_trying(
    timeout_s: float,
    step: Callable[[], Awaitable[T]],
    absent: Callable[[Exception], str | None],
    given_up: Callable[[Exception], Exception],
) -> T:
    """``await step()`` until it returns, up to ``timeout_s``: a failure ``absent`` describes
    (something not there yet) is logged and retried with backoff, and at the deadline
    raised as ``given_up`` makes it; any other is raised at once."""
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        attempt += 1
        left = deadline - time.monotonic()
        try:
            # An address that swallows packets would hold one attempt for the client's
            # whole request timeout; the deadline is the caller's, so it bounds each one.
            async with asyncio.timeout(max(0.1, left)):
                return await step()
        except Exception as e:
            what = absent(e)
            if what is None:
                raise
            if time.monotonic() >= deadline:
                raise given_up(e) from None
        # The last attempt comes at the deadline itself.
        wait = min(backoff_s(attempt, _FIRST_RETRY_S, _MAX_RETRY_S), deadline - time.monotonic())
        log.warning(
            "%s; retry %d in %.1f s, giving up %g s after the start",
            what, attempt, max(0.0, wait), timeout_s,
        )  # fmt: skip
        await asyncio.sleep(max(0.0, wait))


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

    def absent(e: Exception) -> str | None:
        if isinstance(e, TopicMissing):
            return f"no topic {e.topic} on {bootstrap} yet" if wait_for_topics else None
        if _unreached(e):
            return f"no broker at {bootstrap} yet ({type(e).__name__})"
        return None

    def given_up(e: Exception) -> Exception:
        if isinstance(e, TopicMissing):
            return e
        return BrokerUnreachable(bootstrap, connect_timeout_s)

    async def quietly() -> T:
        with quiet(logging.getLogger("aiokafka")):
            return await step()

    return await keep_trying(connect_timeout_s, quietly, absent, given_up)


class RedisUnreachable(Exception):
    """No Redis at ``url`` answered within ``waited_s``."""

    def __init__(self, url: str, waited_s: float) -> None:
        self.what = (
            f"no Redis answered at {url} within {waited_s:g} s (is it running, is the "
            "address right?)"
        )
        super().__init__(self.what)


async def reach_redis(url: str, connect_timeout_s: float, ping: Callable[[], Awaitable[T]]) -> T:
    """``await ping()`` (a first command to the Redis at ``url``), retried with backoff
    while nothing answers there, up to ``connect_timeout_s``; then RedisUnreachable. A
    refusal (a wrong password, a command not allowed) is raised at once."""

    def absent(e: Exception) -> str | None:
        if isinstance(e, RedisAuthenticationError | RedisAuthorizationError):
            return None  # redis-py words a refused password as a connection error
        if isinstance(e, RedisConnectionError | RedisTimeoutError | OSError | TimeoutError):
            return f"no Redis at {url} yet ({type(e).__name__})"
        return None

    return await keep_trying(
        connect_timeout_s, ping, absent, lambda _: RedisUnreachable(url, connect_timeout_s)
    )


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
