"""Riding out a broker that goes away: the replay waits while the broker keeps
acknowledging something, and gives up, naming the deadline, once it has
acknowledged nothing for that long."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiokafka.errors import KafkaTimeoutError

from core.reach import BrokerUnreachable, quiet, reach_topics
from core.topology import TopicMissing
from ingest.codecs.errors import SourceError

log = logging.getLogger(__name__)

T = TypeVar("T")

# A wait for the broker says so on the console after this long.
_OUTAGE_NOTICE_S = 5.0
# While the broker acknowledges nothing, whether the topic is still there is asked this
# often, each answer waited for this long at most.
_CHECK_EVERY_S = 10.0
_CHECK_TIMEOUT_S = 10.0


class BrokerOutage(RuntimeError):
    """The broker acknowledged nothing for the replay's outage deadline."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = where
        self.what = what


class TopicLost(BrokerOutage):
    """The replay's topic was deleted (or deleted and created again) while it ran: what
    was sent went with the old log, so going on would leave a hole in the day. The broker
    is there; waiting for it would not bring the topic back."""


class OutageGuard:
    """Waits on the broker's acknowledgements with the replay's outage deadline.

    ``check``, when set, asks whether the topic is still the one the replay began with
    (TopicLost if not): a deleted topic leaves the client retrying, silently, exactly as
    an absent broker does, so a silence is checked once it is noticed and every
    ``_CHECK_EVERY_S`` after.
    """

    def __init__(self, bootstrap: str, deadline_s: float, stop: asyncio.Event) -> None:
        self.bootstrap = bootstrap
        self.deadline_s = deadline_s
        self._stop = stop  # a stop request ends a wait for an absent broker early
        self.last_ack = 0.0  # monotonic time of the latest acknowledgement
        self.check: Callable[[], Awaitable[None]] | None = None

    async def _checked(self) -> None:
        """Run ``check``; only TopicLost comes out (a broker away is the outage itself)."""
        if self.check is None:
            return
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT_S):
                await self.check()
        except TopicLost:
            raise
        except Exception as e:
            log.debug("topic check during a silence: %r", e)

    def acked_one(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.last_ack = time.monotonic()

    async def guard(self, aw: Awaitable[T]) -> T:
        """Wait for ``aw`` while the broker keeps acknowledging something; BrokerOutage
        once it has acknowledged nothing for ``deadline_s``."""
        fut = asyncio.ensure_future(aw)
        if fut.done():
            return fut.result()
        began = time.monotonic()
        noticed = False
        checked_at = 0.0
        quiet_client = contextlib.ExitStack()
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=1.0)
                if done:
                    break
                silent = time.monotonic() - max(began, self.last_ack)
                if silent > self.deadline_s:
                    raise BrokerOutage(
                        f"--bootstrap {self.bootstrap}",
                        f"the broker acknowledged nothing for {silent:.0f} s "
                        f"(--outage-deadline {self.deadline_s:g}); the manifest counts "
                        "what it acknowledged",
                    )
                if self._stop.is_set() and silent > _OUTAGE_NOTICE_S:
                    # Asked to stop: not kept waiting for a broker that is away.
                    raise BrokerOutage(
                        f"--bootstrap {self.bootstrap}",
                        f"stopped while the broker acknowledged nothing ({silent:.0f} s); the "
                        "manifest counts what it acknowledged",
                    )
                if silent > _OUTAGE_NOTICE_S and time.monotonic() - checked_at > _CHECK_EVERY_S:
                    checked_at = time.monotonic()
                    await self._checked()
                if silent > _OUTAGE_NOTICE_S and not noticed:
                    noticed = True
                    # The client logs each failed connection; this line says it once.
                    quiet_client.enter_context(quiet(logging.getLogger("aiokafka")))
                    log.warning(
                        "the broker at %s has acknowledged nothing for %.0f s; retrying for up "
                        "to %g s",
                        self.bootstrap,
                        silent,
                        self.deadline_s,
                    )
        except BaseException:
            if not fut.done() and not isinstance(aw, asyncio.Future):
                fut.cancel()  # a send not yet queued: nothing of it reaches the broker
            raise
        finally:
            quiet_client.close()
        if noticed:
            log.warning("the broker at %s acknowledges again", self.bootstrap)
        try:
            return fut.result()
        except KafkaTimeoutError:
            raise BrokerOutage(
                f"--bootstrap {self.bootstrap}",
                f"the broker did not take a batch within the producer's timeout "
                f"(--outage-deadline {self.deadline_s:g})",
            ) from None

    async def acked(self, futs: list[asyncio.Future[Any]]) -> None:
        for fut in futs:
            if fut.done():
                fut.result()  # raises the broker's error, if any
            else:
                await self.guard(fut)


async def reach_topic(bootstrap: str, topic: str, connect_timeout_s: float) -> list[int]:
    """The topic's partitions, waiting up to ``connect_timeout_s`` for a broker;
    SourceError naming the address or the topic."""
    try:
        return (await reach_topics(bootstrap, [topic], connect_timeout_s))[topic]
    except BrokerUnreachable as e:
        raise SourceError(e.where, e.what) from None
    except TopicMissing:
        raise SourceError(
            f"--topic {topic}", f"no such topic on {bootstrap} (create it: tickscale topics)"
        ) from None
