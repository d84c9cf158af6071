"""Everything the handler keeps in Redis, off the hot path.

Three things live here: order-book snapshots (tagged with the input offset
they reflect and the input topic's id, for fast restore after a partition
move), the latest quote and
trade per symbol (for downstream services that need a value now), and the
handler's own throughput (for the scaler's capacity estimate).

Redis is a cache, never a dependency of correctness: writes are batched by a
background task, a failed write is counted and retried with the newest data
only, and a missing or stale snapshot just means a longer replay on restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core.constants import (
    HANDLER_STATS_TTL_S,
    REDIS_BOOK_SNAPSHOT,
    REDIS_HANDLER_LEAVE,
    REDIS_HANDLER_STATS,
    REDIS_LAST_QUOTE,
    REDIS_LAST_TRADE,
)
from ingest import metrics

log = logging.getLogger(__name__)


def snapshot_key(group: str, topic: str, partition: int) -> str:
    return f"{REDIS_BOOK_SNAPSHOT}{group}:{topic}:{partition}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    offset: int
    blob: bytes
    topic_id: str  # the input topic's id when it was written; "" if unknown


class RedisSink:
    """Batched, failure-tolerant writer of snapshots, last ticks and stats."""

    def __init__(
        self,
        url: str,
        handler_id: str,
        flush_interval_s: float = 0.1,
        static: dict[str, str] | None = None,
        on_leave: Callable[[], None] | None = None,
    ) -> None:
        """:param static: fields written with every stats report (what the handler can do)
        :param on_leave: called once the scaler has set this handler's leave key (read
            with each stats report): its replacement is starting"""
        # Short timeouts: a hung Redis must not stall snapshot restore for long.
        self._r = aioredis.Redis.from_url(
            url, socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=0
        )
        self.handler_id = handler_id
        self._interval = flush_interval_s
        self._latest: dict[str, dict[str, Any]] = {}  # redis key -> mapping
        self._snapshots: dict[str, tuple[int, bytes]] = {}
        # Which incarnation of its topic each snapshot key is written for (``bind``).
        self._topic_ids: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._stats: dict[str, float] = {"messages": 0, "busy_s": 0.0}
        self._static = dict(static or {})
        self._on_leave = on_leave
        self._last_stats = 0.0
        self.healthy = True

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis-sink")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._flush()  # best effort: final snapshots make the next restore short
        await self._r.aclose()

    async def flush(self) -> None:
        """Write what is queued now (best effort, as the background flush)."""
        await self._flush()

    # Producers of data (called from the hot path: no I/O here) ----------------

    def last_ticks(self, ticks: list[dict[str, Any]]) -> None:
        latest = self._latest
        for t in ticks:
            if t["kind"] == "trade":
                latest[REDIS_LAST_TRADE + t["symbol"]] = t
            else:
                latest[REDIS_LAST_QUOTE + t["symbol"]] = t

    def bind(self, key: str, topic_id: str | None) -> None:
        """Stamp the snapshots written under ``key`` from now on with ``topic_id``: the
        partition's restore binds its key to the incarnation it restored from."""
        if self._topic_ids.get(key) != (topic_id or ""):
            # A snapshot still queued was taken of another incarnation's log.
            self._snapshots.pop(key, None)
        self._topic_ids[key] = topic_id or ""

    def snapshot(self, key: str, offset: int, blob: bytes) -> None:
        self._snapshots[key] = (offset, blob)

    def stats(
        self, messages: int, busy_s: float, cpu_s: float, batches: int, max_batch: int
    ) -> None:
        self._stats = {
            "messages": messages,
            "busy_s": busy_s,
            "cpu_s": cpu_s,
            "batches": batches,
            "max_batch": max_batch,
        }

    # Reads ------------------------------------------------------------------------

    async def load_snapshot(self, key: str) -> Snapshot | None:
        try:
            d: dict[Any, Any] = await self._r.hgetall(key)
        except (RedisError, OSError) as e:
            metrics.REDIS_ERRORS.inc()
            log.warning("snapshot load from Redis failed (%s); restoring by full replay", e)
            return None
        if not d or b"offset" not in d or b"blob" not in d:
            return None
        return Snapshot(int(d[b"offset"]), d[b"blob"], d.get(b"topic_id", b"").decode())

    # Background flush ---------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._flush()

    async def _flush(self) -> None:
        latest, self._latest = self._latest, {}
        snaps, self._snapshots = self._snapshots, {}
        now = time.time()
        send_stats = now - self._last_stats >= 1.0
        if not latest and not snaps and not send_stats:
            return
        try:
            async with self._r.pipeline(transaction=False) as p:
                for key, t in latest.items():
                    p.hset(key, mapping={k: "" if v is None else str(v) for k, v in t.items()})
                for key, (offset, blob) in snaps.items():
                    topic_id = self._topic_ids.get(key, "")
                    p.hset(
                        key,
                        mapping={"offset": offset, "blob": blob, "topic_id": topic_id, "ts": now},
                    )
                if send_stats:
                    sk = REDIS_HANDLER_STATS + self.handler_id
                    stats: dict[Any, Any] = {
                        **self._static,
                        **self._stats,
                        **metrics.guard_figures(),
                        "ts": now,
                    }
                    p.hset(sk, mapping=stats)
                    p.expire(sk, HANDLER_STATS_TTL_S)
                    if self._on_leave is not None:
                        p.getdel(REDIS_HANDLER_LEAVE + self.handler_id)
                done = await p.execute()
            if send_stats and self._on_leave is not None and done[-1]:
                self._on_leave()
            if send_stats:
                self._last_stats = now
            if not self.healthy:
                log.info("Redis writes recovered")
            self.healthy = True
        except (RedisError, OSError) as e:
            metrics.REDIS_ERRORS.inc()
            if self.healthy:
                log.warning("Redis write failed (%s); ticks keep flowing, cache is stale", e)
            self.healthy = False
            # Keep only the newest values for the retry: no unbounded backlog.
            for k, v in latest.items():
                self._latest.setdefault(k, v)
            for k, s in snaps.items():
                self._snapshots.setdefault(k, s)
