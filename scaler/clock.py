"""Which moment of the trading day it is, for the calendar signal.

``wall``: the real clock. ``replay``: the clock the replay feed publishes in
Redis (``ingest.replay.clock``), extrapolated at the replay speed between its
updates, so a day replayed at 60x pre-scales for its own open. A replay clock
that has not been refreshed for ``stale_s`` means no replay is running: then
there is no session to scale for, and lag and rate decide alone.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Protocol
from zoneinfo import ZoneInfo

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.constants import REDIS_REPLAY_CLOCK

log = logging.getLogger(__name__)

EXCHANGE_TZ = ZoneInfo("America/New_York")


@dataclass(frozen=True)
class MarketTime:
    when: float  # unix time on the market's clock
    speed: float  # market seconds per wall second (1 for the wall clock)


class MarketClock(Protocol):
    async def now(self) -> MarketTime | None: ...


class WallClock:
    async def now(self) -> MarketTime | None:
        return MarketTime(time.time(), 1.0)


class ReplayClock:
    def __init__(self, redis: Redis, key: str = REDIS_REPLAY_CLOCK, stale_s: float = 10.0) -> None:
        self.redis = redis
        self.key = key
        self.stale_s = stale_s

    async def now(self) -> MarketTime | None:
        try:
            raw = await self.redis.hgetall(self.key)
        except (RedisError, OSError) as e:
            log.warning("cannot read the replay clock: %s", e)
            return None
        d = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        try:
            day = dt.date.fromisoformat(d["date"])
            clock_s = int(d["clock_ns"]) / 1e9
            wall = float(d["wall"])
            speed = float(d["speed"])
        except (KeyError, ValueError):
            return None
        age = time.time() - wall
        if age > self.stale_s:
            return None
        midnight = dt.datetime.combine(day, dt.time(0), tzinfo=EXCHANGE_TZ).timestamp()
        # speed 0 = "max": nothing to extrapolate with, use the last published clock.
        return MarketTime(midnight + clock_s + max(age, 0.0) * speed, speed or 1.0)
