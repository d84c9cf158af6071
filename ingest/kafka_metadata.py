"""A backoff aiokafka's producer lacks: metadata requests while a partition has no leader.

Shared by every producer that must ride out a broker outage (the replay, the handlers).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import cast

from aiokafka import AIOKafkaProducer


def throttle_metadata_updates(producer: AIOKafkaProducer, every_s: float) -> None:
    """At most one metadata request every ``every_s`` from this producer's client.

    While a partition has no leader (a broker shutting down or starting) aiokafka
    0.14's sender asks for metadata again as soon as the last request failed, with
    no backoff: a core spent on refused connections for the whole outage (and
    thousands of log lines a second). Later asks wait out the interval instead.
    """
    client = producer.client
    force = client.force_metadata_update
    last = -every_s
    delayed: asyncio.Task[bool] | None = None

    async def later(delay: float) -> bool:
        nonlocal last
        await asyncio.sleep(delay)
        last = time.monotonic()
        return bool(await force())

    def throttled() -> Awaitable[bool]:
        nonlocal last, delayed
        if delayed is not None and not delayed.done():
            return delayed  # one update waits out the interval for every ask
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            return cast(Awaitable[bool], force())
        delayed = asyncio.ensure_future(later(last + every_s - now))
        return delayed

    client.force_metadata_update = throttled
