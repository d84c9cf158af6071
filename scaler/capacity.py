"""Per-handler capacity, learned from what the handlers report about themselves.

Every handler keeps a hash at ``REDIS_HANDLER_STATS + id`` with cumulative
``messages`` processed, ``busy_s`` spent processing (wall time), ``cpu_s`` of
that spent on the CPU, ``batches`` (one transaction per partition each) and its
``max_batch``. Capacity is learned from these rather than configured.

Messages per busy second would be the obvious figure, but it depends on the
load: a busy second is CPU, which grows with the messages, plus waits for the
transaction's broker round trips, which grow with the batches. A quiet feed
makes small batches, so the same handler shows a few hundred messages per busy
second at midday and tens of thousands at the open. The estimate therefore
projects the window's costs to a handler that never waits for input, i.e.
runs full batches: with ``c`` CPU seconds per message and ``w`` waiting seconds
per batch, a batch of ``max_batch`` takes ``w + c * max_batch``:

    capacity = max_batch / (w + c * max_batch)

``c`` still carries each batch's fixed CPU, so the projection errs low, never
high. Handlers that report no CPU time fall back to messages per busy second.
The estimate is the highest windowed value of the last ``hold_s``, so a
quiet stretch does not talk the ceiling down; the lag signal still catches a
handler that really became slower.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.constants import REDIS_HANDLER_STATS
from core.repeats import RepeatedFailure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandlerStats:
    handler_id: str
    messages: int
    busy_s: float
    ts: float
    cpu_s: float | None = None  # None: an older handler that does not report it
    batches: int = 0
    max_batch: int = 0


def project(msgs: int, busy_s: float, cpu_s: float | None, batches: int, max_batch: int) -> float:
    """Messages per second of full batches, from one window's costs (see the module)."""
    if cpu_s is None or batches <= 0 or max_batch <= 0:
        return msgs / busy_s
    wait = max(0.0, busy_s - cpu_s) / batches
    per_msg = cpu_s / msgs
    return max_batch / (wait + per_msg * max_batch)


class CapacityEstimator:
    """d(messages)/d(busy_s) summed over handlers, over a sliding window.

    :param window_s: how far back the estimate looks; long enough to span
        several batches, short enough to follow a code or host change.
    :param min_busy_s: busy seconds needed in the window before the estimate
        is trusted; below it ``estimate()`` returns None and the caller falls back.
    :param hold_s: how long the highest windowed value stands (see the module).
    """

    def __init__(
        self, window_s: float = 60.0, min_busy_s: float = 2.0, hold_s: float = 3600.0
    ) -> None:
        self.window_s = window_s
        self.min_busy_s = min_busy_s
        self.hold_s = hold_s
        self._hist: dict[str, deque[HandlerStats]] = {}
        self._seen: deque[tuple[float, float]] = deque()  # (ts, windowed value)

    def observe(self, stats: HandlerStats) -> None:
        h = self._hist.setdefault(stats.handler_id, deque())
        if h and (
            stats.messages < h[-1].messages
            or stats.busy_s < h[-1].busy_s
            or stats.batches < h[-1].batches
        ):
            h.clear()  # counters went backwards: the handler restarted under the same id
        if h and stats.ts <= h[-1].ts:
            return  # not refreshed since the last poll
        h.append(stats)
        while len(h) > 2 and h[1].ts <= stats.ts - self.window_s:
            h.popleft()

    def forget_older_than(self, cutoff: float) -> None:
        for hid in [k for k, h in self._hist.items() if not h or h[-1].ts < cutoff]:
            del self._hist[hid]

    def windowed(self) -> float | None:
        """Per-handler capacity over the window (None until ``min_busy_s``): the mean of the
        handlers' projections, weighted by their busy time."""
        msgs = 0
        busy = 0.0
        weighted = 0.0
        for h in self._hist.values():
            if len(h) < 2:
                continue
            a, b = h[0], h[-1]
            m, bs = b.messages - a.messages, b.busy_s - a.busy_s
            if m <= 0 or bs <= 0:
                continue
            cpu = None if a.cpu_s is None or b.cpu_s is None else b.cpu_s - a.cpu_s
            msgs += m
            busy += bs
            weighted += bs * project(m, bs, cpu, b.batches - a.batches, b.max_batch)
        if busy < self.min_busy_s or msgs <= 0:
            return None
        return weighted / busy

    def estimate(self) -> float | None:
        """The highest windowed value of the last ``hold_s`` (None if there is none)."""
        now = max((h[-1].ts for h in self._hist.values() if h), default=None)
        if now is None:
            return max((v for _, v in self._seen), default=None)
        current = self.windowed()
        if current is not None and (not self._seen or self._seen[-1][0] < now):
            self._seen.append((now, current))
        while self._seen and self._seen[0][0] < now - self.hold_s:
            self._seen.popleft()
        return max((v for _, v in self._seen), default=None)

    @property
    def handlers(self) -> int:
        return len(self._hist)


async def read_handler_stats(redis: Redis, prefix: str = REDIS_HANDLER_STATS) -> list[HandlerStats]:
    """All live handlers' self-reports (expired keys = dead handlers, already gone)."""
    out: list[HandlerStats] = []
    keys = [k async for k in redis.scan_iter(match=prefix + "*", count=500)]
    if not keys:
        return out
    async with redis.pipeline(transaction=False) as p:
        for k in keys:
            p.hgetall(k)
        rows = await p.execute()
    for key, row in zip(keys, rows, strict=True):
        k = key.decode() if isinstance(key, bytes) else str(key)
        d = {(a.decode() if isinstance(a, bytes) else a): b for a, b in row.items()}
        try:
            out.append(
                HandlerStats(
                    k[len(prefix) :],
                    int(float(d["messages"])),
                    float(d["busy_s"]),
                    float(d["ts"]),
                    float(d["cpu_s"]) if "cpu_s" in d else None,
                    int(float(d.get("batches", 0))),
                    int(float(d.get("max_batch", 0))),
                )
            )
        except (KeyError, ValueError):
            log.debug("ignoring malformed handler stats at %s: %r", k, d)
    return out


class RedisCapacity:
    """The estimator fed from Redis, with the configured fallback until it has data."""

    def __init__(
        self, redis: Redis, fallback: float, window_s: float = 60.0, hold_s: float = 3600.0
    ) -> None:
        self.redis = redis
        self.fallback = fallback
        self.est = CapacityEstimator(window_s, hold_s=hold_s)
        # Redis down fails this every poll: said once a minute, not each second.
        self._failing = RepeatedFailure(log, "reading the handlers' stats from Redis")

    async def poll(self) -> tuple[float, str]:
        try:
            for s in await read_handler_stats(self.redis):
                self.est.observe(s)
        except (RedisError, OSError) as e:
            self._failing.failed(e)
        else:
            self._failing.succeeded()
        self.est.forget_older_than(time.time() - 2 * self.est.window_s)
        cap = self.est.estimate()
        if cap is None:
            return self.fallback, "fallback"
        return cap, "learned"


class SaturationCapacity:
    """Per-handler capacity from the group's throughput while it was saturated.

    Self-reports can be wrong (a busy second that waited on the broker, a host
    that got slower); throughput while a backlog waits is not. While the group
    is stable and the backlog is older than in-flight work, the per-handler
    figure ``processed * ceil(P/n) / P`` is a measurement of the busiest
    handler's ceiling, and the estimate follows it with a time-weighted moving
    average (half-life ``halflife_s`` of saturated time), so a configured
    figure 30% off is corrected within a minute or two of the first backlog.
    Unsaturated throughput is only a lower bound: it can raise the estimate,
    never lower it.
    """

    def __init__(self, prior: float, halflife_s: float = 60.0) -> None:
        if prior <= 0:
            raise ValueError("prior capacity must be > 0")
        self.value = prior
        self.saturated_s = 0.0
        self._ewma_tau = halflife_s / math.log(2)

    def observe(
        self, processed_per_s: float, members: int, partitions: int, saturated: bool, dt: float
    ) -> float:
        """One interval's observation; returns the estimate."""
        if members <= 0 or processed_per_s <= 0 or dt <= 0:
            return self.value
        busiest = math.ceil(partitions / min(members, partitions)) if partitions > 0 else 1
        per_handler = (
            processed_per_s * busiest / partitions
            if partitions > 0
            else (processed_per_s / members)
        )
        if saturated:
            w = 1.0 - math.exp(-dt / self._ewma_tau)
            self.value += w * (per_handler - self.value)
            self.saturated_s += dt
        elif per_handler > self.value:
            self.value = per_handler
        return self.value

    @property
    def source(self) -> str:
        return "learned" if self.saturated_s > 0 else "fallback"
