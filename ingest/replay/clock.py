"""Publishes the replay clock to Redis while a replay runs.

A day replayed at 60x opens at 09:30 of *its* clock, long before or after
09:30 today; the scaler's calendar signal needs that clock to pre-scale for
the replayed open. Best effort: without Redis the replay runs as before.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.constants import REDIS_REPLAY_CLOCK
from core.secrets import client_secrets
from ingest.replay.publisher import ReplayStats

log = logging.getLogger(__name__)


async def publish_clock(
    redis_url: str,
    stats: ReplayStats,
    day: str,
    speed: float | None,
    stop: asyncio.Event,
    period_s: float = 1.0,
    key: str = REDIS_REPLAY_CLOCK,
) -> None:
    """Write ``{date, clock_ns, wall, speed}`` every ``period_s`` until ``stop`` is set."""
    redis = Redis.from_url(
        client_secrets().redis_url(redis_url), socket_timeout=2, socket_connect_timeout=2
    )
    warned = False
    try:
        while not stop.is_set():
            if stats.source_clock_ns:
                try:
                    await redis.hset(
                        key,
                        mapping={
                            "date": day,
                            "clock_ns": stats.source_clock_ns,
                            "wall": time.time(),
                            "speed": speed or 0.0,
                        },
                    )
                    await redis.expire(key, 60)
                    warned = False
                except (RedisError, OSError) as e:
                    if not warned:
                        log.warning("cannot publish the replay clock to Redis: %s", e)
                        warned = True
            try:
                await asyncio.wait_for(stop.wait(), timeout=period_s)
            except TimeoutError:
                pass
    finally:
        await redis.aclose()
