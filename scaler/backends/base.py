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


class BackendUnreachable(BackendError):
    """Nothing answered where the backend was pointed, however long it was waited for: an
    engine down or an address mistyped, not a setting the engine refused."""


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
    version: str = ""  # the HandlerVersion name it was started with; "" if unlabelled


@dataclass(frozen=True)
class HandlerVersion:
    """What a handler runs: a name (labels, metrics) and an image or a command line.

    Backends start handlers of their current version unless told another (a
    rollout's canary); docker and swarm use ``image``, the process backend
    ``command`` (None: this installation's own ``tickscale handler``).
    """

    name: str
    image: str | None = None
    command: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "image": self.image, "command": self.command}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> HandlerVersion:
        cmd = d.get("command")
        image = d.get("image")
        return cls(
            str(d["name"]),
            str(image) if image else None,
            tuple(str(a) for a in cmd) if isinstance(cmd, list | tuple) else None,
        )


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
    version: HandlerVersion  # what ``add`` starts unless told otherwise
    # remove_ids stops the handlers named; False: the platform picks (a Swarm scale-down)
    stops_chosen: bool

    async def start(self) -> None:
        """Connect and check access; raise BackendError naming the setting on failure."""
        ...

    async def close(self) -> None:
        """Release connections. Handlers keep running unless the backend says otherwise."""
        ...

    async def list(self) -> builtins.list[HandlerInstance]: ...

    async def add(self, n: int, version: HandlerVersion | None = None) -> builtins.list[str]:
        """Start ``n`` handlers (of ``version``, else the current one); return their ids."""
        ...

    async def remove(self, n: int) -> builtins.list[str]:
        """Stop ``n`` handlers, youngest first (a handler still starting costs no
        rebalance), each with SIGTERM and the grace period; return their ids."""
        ...

    async def remove_ids(self, ids: builtins.list[str]) -> builtins.list[str]:
        """Stop these handlers (SIGTERM and the grace period, together); return their ids.
        One that has exited already is not stopped again; where the platform keeps its
        slot to restart it (Swarm), the slot is released, once however often asked."""
        ...

    async def announce_replacement(self, ids: builtins.list[str]) -> builtins.list[str]:
        """Tell these handlers their replacement is starting (LEAVE_SIGNAL): each leaves
        the group at the next rebalance instead of rejoining. Returns those told; those
        a backend cannot signal are told through Redis (``scaler.handover.announce``)."""
        ...

    def set_version(self, version: HandlerVersion) -> None:
        """Start handlers of ``version`` from now on (a promoted rollout)."""
        ...

    async def health(self) -> BackendHealth: ...

    async def retire(self) -> None:
        """On the scaler's exit, after its handlers were removed: wait until they have
        gone and drop what the backend made for them (so their network can go too)."""
        ...
