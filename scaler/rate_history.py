"""Earlier days' ingest rates, per minute of the trading day, kept in Redis.

The learned session floors (``scaler.floors``) predict a session from what
earlier days saw at the same minute, so the history must outlive the scaler.
The leading scaler keeps what its policy observed: one sample per market day
and scaler run, as the sum and count of the rates seen per minute bucket. A
restart mid-day so leaves two samples covering different minutes, and a day
replayed twice counts twice (each replay is a day the fleet lived through).
A starting scaler loads its fleet's newest ``days`` samples.

Keys: ``tickscale:scaler:rates:<fleet>``, a sorted set of samples by the wall
time they were last written, and ``tickscale:scaler:rates:<fleet>:<sample>``,
a hash of ``<anchor>:<minute>:sum`` and ``:n`` fields. A sample not written for
``keep_s`` expires, and the index keeps the newest ``4 * days`` samples.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.constants import REDIS_PREFIX
from scaler.floors import LearnedFloors

log = logging.getLogger(__name__)

KEY = REDIS_PREFIX + "scaler:rates"


class RateHistory:
    """Loads a fleet's earlier days into ``floors`` and keeps what ``floors`` observes.

    :param run_id: this scaler run's name; with the market date it names the samples.
    """

    def __init__(
        self,
        redis: Redis,
        fleet: str,
        floors: LearnedFloors,
        run_id: str,
        keep_s: float = 90 * 86400.0,
    ) -> None:
        self.redis = redis
        self.index = f"{KEY}:{fleet}"
        self.floors = floors
        self.run_id = run_id
        self.keep_s = keep_s

    async def load(self) -> int:
        """The newest samples into the floors' history, oldest first; returns how many."""
        newest = await self.redis.zrevrange(self.index, 0, self.floors.days - 1)
        ids = [_text(i) for i in newest]
        loaded = 0
        for sample in reversed(ids):
            means = _means(await self.redis.hgetall(f"{self.index}:{sample}"))
            if means:
                self.floors.learn_means(means)
                loaded += 1
        log.info("learned session floors: %d earlier day(s) of %s", loaded, self.index)
        return loaded

    async def flush(self) -> int:
        """Write what the floors observed since the last flush; returns buckets written."""
        taken = self.floors.take_today()
        if not taken:
            return 0
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        samples = set()
        for (day, anchor, minute), (total, n) in taken.items():
            sample = f"{day.isoformat()}:{self.run_id}"
            samples.add(sample)
            key = f"{self.index}:{sample}"
            pipe.hincrbyfloat(key, f"{anchor}:{minute}:sum", total)
            pipe.hincrby(key, f"{anchor}:{minute}:n", n)
        for sample in samples:
            pipe.expire(f"{self.index}:{sample}", int(self.keep_s))
            pipe.zadd(self.index, {sample: now})
        pipe.zremrangebyscore(self.index, "-inf", now - self.keep_s)
        pipe.zremrangebyrank(self.index, 0, -4 * self.floors.days - 1)
        pipe.expire(self.index, int(self.keep_s))
        try:
            await pipe.execute()
        except (RedisError, OSError) as e:
            # A lost poll's worth of rates only thins a mean; the poll goes on (lease, rollout).
            log.warning("rate history: could not write %d bucket(s): %s", len(taken), e)
            return 0
        return len(taken)


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _means(fields: dict[Any, Any]) -> dict[tuple[str, int], float]:
    """``{b"o:12:sum": .., b"o:12:n": ..}`` -> ``{("o", 12): mean}``; malformed fields skipped."""
    acc: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for k, v in fields.items():
        try:
            anchor, minute, what = _text(k).split(":")
            slot = 0 if what == "sum" else 1 if what == "n" else None
            if slot is None:
                continue
            acc[(anchor, int(minute))][slot] = float(_text(v))
        except ValueError:
            continue  # not ours: a key written by something else is ignored, not fatal
    return {b: total / n for b, (total, n) in acc.items() if n > 0}
