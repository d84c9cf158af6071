"""The one small interface every way of running handlers implements.

The scaler only ever asks four things: which handlers of mine exist, start n
more, stop n (gracefully: SIGTERM, then a grace period to drain and commit),
and is the backend itself reachable. Everything about containers, services or
processes stays behind it.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Protocol


class BackendError(RuntimeError):
    """The backend could not do what was asked (engine unreachable, API refused)."""


@dataclass(frozen=True)
class HandlerInstance:
    """One handler the backend runs for this scaler.

    :param id: backend-specific identity (container id, task id, pid)
    :param name: human-readable name (container name, handler id)
    :param state: ``running`` or ``starting``; dead ones are never listed
    :param started_at: unix time the backend started it
    """

    id: str
    name: str
    state: str
    started_at: float


@dataclass(frozen=True)
class BackendHealth:
    ok: bool
    detail: str = ""
    info: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HandlerSpec:
    """What every handler the backend starts is told (its TICKSCALE_HANDLER_* settings).

    Built once by the scaler from its own settings, so all backends start
    identical handlers.
    """

    bootstrap: str
    in_topic: str
    out_topic: str
    deadletter_topic: str
    group: str
    redis_url: str | None
    extra_env: dict[str, str] = field(default_factory=dict)
    # File name under /run/secrets -> host file (docker) or swarm secret (swarm).
    secrets: dict[str, str] = field(default_factory=dict)
    kafka_username: str | None = None

    def env(self) -> dict[str, str]:
        env = {
            "TICKSCALE_HANDLER_BOOTSTRAP": self.bootstrap,
            "TICKSCALE_HANDLER_IN_TOPIC": self.in_topic,
            "TICKSCALE_HANDLER_OUT_TOPIC": self.out_topic,
            "TICKSCALE_HANDLER_DEADLETTER_TOPIC": self.deadletter_topic,
            "TICKSCALE_HANDLER_GROUP": self.group,
        }
        if self.redis_url:
            env["TICKSCALE_HANDLER_REDIS_URL"] = self.redis_url
        if self.kafka_username:
            env["TICKSCALE_KAFKA_USERNAME"] = self.kafka_username
        env.update(self.extra_env)
        return env


class Backend(Protocol):
    """Runs feed handlers. Implementations own their connections (start/close).

    ``list`` also clears away handlers that died (exited containers, reaped
    processes) so the scaler sees the live count and replaces the dead by
    scaling back up; it never touches anything it did not start or label.
    """

    name: str

    async def start(self) -> None:
        """Connect and check access; raise BackendError naming the setting on failure."""
        ...

    async def close(self) -> None:
        """Release connections. Handlers keep running unless the backend says otherwise."""
        ...

    async def list(self) -> builtins.list[HandlerInstance]: ...

    async def add(self, n: int) -> builtins.list[str]:
        """Start ``n`` handlers; return their ids."""
        ...

    async def remove(self, n: int) -> builtins.list[str]:
        """Stop ``n`` handlers, youngest first (a handler still starting costs no
        rebalance), each with SIGTERM and the grace period; return their ids."""
        ...

    async def health(self) -> BackendHealth: ...

    async def retire(self) -> None:
        """On the scaler's exit, after its handlers were removed: wait until they have
        gone and drop what the backend made for them (so their network can go too)."""
        ...
