"""The scaler's backend in KEDA mode: a count the HPA is asked to run, not processes.

The scaler's loop decides against ``list()`` and applies through ``add``/``remove``, as
with any backend; here applying a decision only records the new count, which the gRPC
service then reports to KEDA, and the HPA starts or stops the pods. The count is what
was asked for, not what has joined: like a backend's list, it includes handlers still
starting, so the policy's holds (settling, joining) see the change under way and the
reported value does not drop back to the joined count while pods start.

The first ``list()`` adopts the consumer group's members: a KEDA scaler restarted under
a running fleet reports that fleet, and the policy's scale-down steps and windows apply
from there, as a scaler adopting running containers does.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Awaitable, Callable

from scaler.backends.base import BackendHealth, HandlerInstance, HandlerVersion


class ReportedReplicas:
    """A Backend whose handlers are a number (see the module).

    ``members`` (set by the assembler, which owns the probe): the group's current member
    count, read once, on the first ``list()``; unset, the count starts at zero.
    """

    name = "keda"
    stops_chosen = False

    def __init__(self) -> None:
        self.members: Callable[[], Awaitable[int]] | None = None
        self.version = HandlerVersion("keda")
        self.count: int | None = None  # None: not adopted yet (no poll so far)
        self.adopted = asyncio.Event()  # set once the first poll has a count
        self._since = time.time()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def list(self) -> builtins.list[HandlerInstance]:
        if self.count is None:
            self.count = 0 if self.members is None else await self.members()
            self.adopted.set()
        return [
            HandlerInstance(f"replica-{i}", f"replica-{i}", "running", self._since)
            for i in range(self.count)
        ]

    async def add(self, n: int, version: HandlerVersion | None = None) -> builtins.list[str]:
        first = self.count or 0
        self.count = first + n
        self._since = time.time()
        return [f"replica-{i}" for i in range(first, self.count)]

    async def remove(self, n: int) -> builtins.list[str]:
        last = self.count or 0
        self.count = max(0, last - n)
        return [f"replica-{i}" for i in range(self.count, last)]

    async def remove_ids(self, ids: builtins.list[str]) -> builtins.list[str]:
        return await self.remove(len(ids))

    async def announce_replacement(self, ids: builtins.list[str]) -> builtins.list[str]:
        return []  # Kubernetes owns the pods: no rollouts here

    def set_version(self, version: HandlerVersion) -> None:
        self.version = version

    async def health(self) -> BackendHealth:
        return BackendHealth(True, "the HPA runs the handlers")

    async def retire(self) -> None:
        return None
