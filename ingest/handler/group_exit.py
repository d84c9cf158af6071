"""Leaving the group in the middle of a rebalance instead of rejoining it.

A rollout step replaces one handler with another in one rebalance: the new
handler's join opens it, and the handler it replaces must leave during it
rather than rejoin. Told in advance (SIGUSR1, see ``FeedHandler``), the old
handler leaves from its revoke callback, which aiokafka runs when it learns of
the rebalance and before it sends its JoinGroup. aiokafka offers no public way
to do that: its coordinator sends the JoinGroup as soon as the callback
returns, whatever else happened meanwhile. So, from inside the callback:

1. the caller first waits until ``consumer.stop()`` has begun: the coordinator
   is then closing, and neither its loop nor its heartbeat looks the group's
   coordinator up again once it is marked unknown (step 3);
2. LeaveGroup is sent and awaited (the coordinator's own ``maybe_leave_group``,
   which also forgets the member id and generation);
3. the coordinator is marked unknown, so the JoinGroup that follows the
   callback fails in the client instead of reaching the broker (a JoinGroup
   without a member id would register a pending member, and a pending member
   holds the whole rebalance until its session times out); the callback
   returns at once, and the coordinator's loop, closing, ends.

Steps 2 and 3 reach into aiokafka's coordinator, so they live in
``core/aiokafka_internals.py`` (``leave_group_now``), the one module pinned to
aiokafka 0.14.x; the rollout tests assert the one-rebalance outcome against the
real broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer

from core.aiokafka_internals import leave_group_now

log = logging.getLogger(__name__)


async def leave_mid_rebalance(consumer: AIOKafkaConsumer) -> None:
    """Steps 2 and 3 above: call from the revoke callback once the consumer is closing,
    and return from the callback right after."""
    await leave_group_now(consumer)


class Replacement:
    """A rollout's "your replacement is coming" (SIGUSR1, sent before the scaler starts
    it): at the next rebalance, the handler leaves instead of rejoining, so the change is
    one rebalance. A handler that sees no rebalance within ``WINDOW_S`` forgets it."""

    WINDOW_S = 120.0

    def __init__(self) -> None:
        self.announced_at: float | None = None
        self.left = False
        self.consumer_closing = asyncio.Event()  # consumer.stop() has begun (step 1)

    def announce(self) -> None:
        self.announced_at = time.monotonic()
        log.info("replacement announced: leaving the group at the next rebalance")

    def due(self) -> bool:
        return (
            self.announced_at is not None
            and time.monotonic() - self.announced_at < self.WINDOW_S
            and not self.left
        )

    async def leave(self, consumer: AIOKafkaConsumer, request_stop: Callable[[], None]) -> None:
        """From the revoke callback, with the revoked partitions committed and saved: stop,
        and once the consumer is closing, leave and return (the order the module explains)."""
        self.left = True
        request_stop()
        await self.consumer_closing.wait()
        await leave_mid_rebalance(consumer)
        log.info("replaced: left the group at this rebalance instead of rejoining")
