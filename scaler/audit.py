"""Audit trail of scale events: a Redis stream and the log, one entry per change.

Each entry carries the decision as the policy explained it (signal, inputs,
proposals) and what the backend did, so "why did we have 9 handlers at 09:31"
has an answer after the fact. The stream is capped (approximately) so it
cannot grow without bound.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from scaler.policy import Decision

log = logging.getLogger("scaler.audit")


class AuditLog:
    def __init__(self, redis: Redis, stream: str, maxlen: int = 100_000) -> None:
        self.redis = redis
        self.stream = stream
        self.maxlen = maxlen

    async def record(
        self, d: Decision, scaler_id: str, backend: str, result: dict[str, Any]
    ) -> None:
        entry = {
            "time": f"{d.time:.3f}",
            "scaler": scaler_id,
            "from": str(d.current),
            "to": str(d.desired),
            "signal": d.reason,
            "action": d.action,
            "backend": backend,
            "result": orjson.dumps(result).decode(),
            "proposals": orjson.dumps(d.proposals).decode(),
            "inputs": orjson.dumps(d.inputs).decode(),
            "explanation": d.explanation,
        }
        log.info(
            "scale %s %d->%d (%s): %s; backend %s", d.action, d.current, d.desired, d.reason,
            d.explanation, result,
        )  # fmt: skip
        try:
            await self.redis.xadd(
                self.stream,
                entry,  # type: ignore[arg-type]
                maxlen=self.maxlen,
                approximate=True,
            )
        except (RedisError, OSError) as e:
            # The log line above still holds the event; losing Redis must not stop scaling.
            log.warning("audit stream unavailable (%s)", e)


async def read_events(redis: Redis, stream: str, count: int = 1000) -> list[dict[str, Any]]:
    """Scale events oldest first, JSON fields decoded (for tests, reports, the CLI)."""
    out = []
    for _id, fields in await redis.xrange(stream, count=count) or []:
        if not fields:
            continue
        e: dict[str, Any] = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        for k in ("result", "proposals", "inputs"):
            if k in e:
                e[k] = orjson.loads(e[k])
        for k in ("from", "to"):
            if k in e:
                e[k] = int(e[k])
        e["time"] = float(e["time"])
        out.append(e)
    return out
