"""A rollout's state, kept in Redis under the scaler's keys so it outlives any one scaler.

``tickscale rollout`` never acts on handlers: it writes a request (or an abort)
next to the state, and the leading scaler takes it up on its next poll. The
state is one JSON value per fleet, rewritten by the leader at every transition:

    idle -> canary -> promoting -> done
               \\          \\
                +-> rolling_back -> done

A scaler that starts (or takes the lease) mid-rollout reads it and carries on
from where the last one stopped; ``current`` is the version promoted last, which
new handlers are started from even after the scaler's own setting named another.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from core.constants import REDIS_PREFIX
from scaler.backends.base import HandlerVersion

ROLLOUT_KEY = REDIS_PREFIX + "scaler:rollout:"  # + fleet name -> state JSON
REQUEST_KEY = REDIS_PREFIX + "scaler:rollout-request:"  # + fleet name -> request JSON
ABORT_KEY = REDIS_PREFIX + "scaler:rollout-abort:"  # + fleet name -> rollout id

ACTIVE = ("canary", "promoting", "rolling_back")


@dataclass
class RolloutState:
    phase: str = "idle"  # idle | canary | promoting | rolling_back | done
    id: str = ""
    target: dict[str, Any] | None = None  # HandlerVersion.to_dict()
    previous: dict[str, Any] | None = None
    current: dict[str, Any] | None = None  # the last version promoted
    guard: dict[str, float] = field(default_factory=dict)
    canary_id: str | None = None
    extra: bool = False  # the canary ran beside a fleet of one, not in an old one's slot
    started_wall: float = 0.0
    ready_wall: float = 0.0  # when the canary first reported (its warm-up starts)
    window_market: float | None = None  # market time the guard window opened
    window_wall: float = 0.0
    baseline: dict[str, dict[str, Any]] = field(default_factory=dict)  # figures at the window
    last_step_wall: float = 0.0
    handover: dict[str, Any] | None = None  # the change under way (handover.Pending)
    outcome: str = ""  # promoted | rolled_back
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE

    def version(self, which: str) -> HandlerVersion | None:
        d = getattr(self, which)
        return HandlerVersion.from_dict(d) if d else None

    @property
    def target_name(self) -> str:
        return str((self.target or {}).get("name", ""))


@dataclass(frozen=True)
class RolloutRequest:
    version: HandlerVersion
    guard: str = ""  # key=value,... over the scaler's rollout_guard setting
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    time: float = field(default_factory=time.time)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"id": self.id, "time": self.time, "guard": self.guard,
             "version": self.version.to_dict()}
        )  # fmt: skip

    @classmethod
    def from_json(cls, raw: bytes | str) -> RolloutRequest:
        d = orjson.loads(raw)
        return cls(HandlerVersion.from_dict(d["version"]), d.get("guard", ""), d["id"], d["time"])


class RolloutStore:
    """The state, the pending request and the abort flag of one fleet."""

    def __init__(self, redis: Redis, fleet: str) -> None:
        self.redis = redis
        self.key = ROLLOUT_KEY + fleet
        self.request_key = REQUEST_KEY + fleet
        self.abort_key = ABORT_KEY + fleet

    async def load(self) -> RolloutState:
        raw = await self.redis.get(self.key)
        if not raw:
            return RolloutState()
        d = orjson.loads(raw)
        known = RolloutState.__dataclass_fields__
        return RolloutState(**{k: v for k, v in d.items() if k in known})

    async def save(self, st: RolloutState) -> None:
        await self.redis.set(self.key, orjson.dumps(asdict(st)))

    async def request(self, req: RolloutRequest) -> bool:
        """Queue ``req``; False when another request is already waiting."""
        return bool(await self.redis.set(self.request_key, req.to_json(), nx=True))

    async def take_request(self) -> RolloutRequest | None:
        raw = await self.redis.getdel(self.request_key)
        return RolloutRequest.from_json(raw) if raw else None

    async def abort(self, rollout_id: str) -> None:
        await self.redis.set(self.abort_key, rollout_id)

    async def take_abort(self) -> str | None:
        raw = await self.redis.getdel(self.abort_key)
        return raw.decode() if isinstance(raw, bytes) else raw
