"""Audit trail of scale and rollout events: a Redis stream and the log, one entry per change.

Each entry carries the decision as the policy explained it (signal, inputs,
proposals) and what the backend did, so "why did we have 9 handlers at 09:31"
has an answer after the fact. Rollout steps go to the same stream with
``kind=rollout`` (scale entries carry no kind), so one stream tells what the
fleet went through. The stream is capped (approximately) so it cannot grow
without bound.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from scaler import metrics as m
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
        await self._add(entry)

    async def rollout(
        self, scaler_id: str, rollout_id: str, event: str, version: str, reason: str = "",
        detail: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """One rollout step: ``event`` is canary, window, passed, step, promoted,
        rolling_back, rolled_back or rejected; ``reason`` says why, for people."""
        entry = {
            "kind": "rollout", "time": f"{time.time():.3f}", "scaler": scaler_id,
            "rollout": rollout_id, "event": event, "version": version, "reason": reason,
            "detail": orjson.dumps(detail or {}).decode(),
        }  # fmt: skip
        m.ROLLOUT_EVENTS.labels(event).inc()
        log.info("rollout %s of %s: %s%s %s", rollout_id, version, event,
                 f" ({reason})" if reason else "", detail or "")  # fmt: skip
        await self._add(entry)

    async def _add(self, entry: dict[str, str]) -> None:
        try:
            await self.redis.xadd(
                self.stream,
                entry,  # type: ignore[arg-type]
                maxlen=self.maxlen,
                approximate=True,
            )
        except (RedisError, OSError) as e:
            # The log line still holds the event; losing Redis must not stop scaling.
            log.warning("audit stream unavailable (%s)", e)


def decode_event(fields: dict[Any, Any]) -> dict[str, Any]:
    """One stream entry as a dict, its JSON fields decoded."""
    e: dict[str, Any] = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    e.setdefault("kind", "scale")
    for k in ("result", "proposals", "inputs", "detail"):
        if k in e:
            e[k] = orjson.loads(e[k])
    for k in ("from", "to"):
        if k in e:
            e[k] = int(e[k])
    e["time"] = float(e["time"])
    return e


async def read_events(
    redis: Redis, stream: str, count: int = 1000, kind: str = "scale"
) -> list[dict[str, Any]]:
    """Events of ``kind`` (scale, rollout) oldest first, JSON fields decoded (for tests,
    reports, the CLI)."""
    out = []
    for _id, fields in await redis.xrange(stream, count=count) or []:
        if not fields:
            continue
        e = decode_event(fields)
        if e["kind"] == kind:
            out.append(e)
    return out
