"""Leader lease in Redis: of several scalers, exactly one acts.

``SET key id NX PX ttl`` takes the lease; the holder renews it every third of
the TTL with a compare-and-set script, so a renewal can never extend a lease
that another scaler has taken in the meantime. A leader that dies simply stops
renewing: the lease expires and a follower takes it within one TTL plus one
poll. A leader that cannot reach Redis steps down before the lease could have
expired, so two scalers never act at once (as long as clocks run at the same
rate, which Redis expiry assumes anyway).
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.repeats import RepeatedFailure

log = logging.getLogger(__name__)

# Extend only if we still own it; returns 1 when renewed.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class LeaderLease:
    """Background task that keeps trying to hold ``key``; ``is_leader`` says if it does.

    :param ttl_s: lease lifetime; a dead leader is replaced within about this.
    """

    def __init__(self, redis: Redis, key: str, holder: str, ttl_s: float = 5.0) -> None:
        self.redis = redis
        self.key = key
        self.holder = holder
        self.ttl_ms = int(ttl_s * 1000)
        self._valid_until = 0.0  # monotonic; leadership is trusted only before this
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.changed = asyncio.Event()  # set on every gain or loss, for the service loop
        # Redis down fails each attempt (three a TTL): said once a minute, not each time.
        self._failing = RepeatedFailure(log, "leader lease")

    @property
    def is_leader(self) -> bool:
        return time.monotonic() < self._valid_until

    async def start(self) -> None:
        await self._attempt()
        self._task = asyncio.create_task(self._run(), name="leader-lease")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        if self.is_leader:
            # Hand over at once instead of making a follower wait out the TTL.
            try:
                await self.redis.eval(_RELEASE, 1, self.key, self.holder)
            except (RedisError, OSError) as e:
                log.warning("could not release the leader lease: %s", e)
        self._set(False, 0.0)

    async def holder_now(self) -> str | None:
        v = await self.redis.get(self.key)
        return v.decode() if isinstance(v, bytes) else v

    async def _run(self) -> None:
        period = self.ttl_ms / 3000
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=period)
            except TimeoutError:
                pass
            if not self._stop.is_set():
                await self._attempt()

    async def _attempt(self) -> None:
        t0 = time.monotonic()
        try:
            if self.is_leader:
                ok = await self.redis.eval(_RENEW, 1, self.key, self.holder, str(self.ttl_ms))
            else:
                ok = await self.redis.set(self.key, self.holder, nx=True, px=self.ttl_ms)
        except (RedisError, OSError) as e:
            self._failing.failed(e)
            if self.is_leader and time.monotonic() >= self._valid_until - self.ttl_ms / 3000:
                self._set(False, 0.0)
            return
        self._failing.succeeded()
        if ok:
            # Counted from before the request: the lease may have started then.
            self._set(True, t0 + self.ttl_ms / 1000 * 0.9)
        else:
            self._set(False, 0.0)

    def _set(self, leader: bool, valid_until: float) -> None:
        was = self.is_leader
        self._valid_until = valid_until
        if was != leader:
            log.info("%s the leader lease %s", "took" if leader else "lost", self.key)
            self.changed.set()
