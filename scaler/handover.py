"""One rollout change, one rebalance: the new handler joins, then the old one leaves.

Handlers are classic-protocol (eager) members of one consumer group. A join or
a leave opens a rebalance (the group goes to PreparingRebalance); it collects
members until every member of the last generation has rejoined or left, then
completes one new generation. Members learn of it on their next heartbeat and
rejoin at once, and a member that has rejoined cannot leave before that
generation completes: its leave is then a second rebalance.

So a change that starts a handler and stops another at the same moment
rebalances twice (the old one drains and leaves long before the new one has
started and joined) and runs a handler short in between. Instead, the new one
is started first, and the old one gets its SIGTERM the moment the group shows
the new member in PreparingRebalance: it drains, commits and leaves while that
rebalance still collects members, and the generation that completes has the
new one and not the old. The group is read with the scaler's own admin client
(``LagProbe.group_info``), a few times a second, by a task beside the scaler's
loop, which itself never waits for the join. That alone is a race: the old one
must leave before its own next heartbeat tells it of the rebalance (it would
rejoin first, and its leave be a second rebalance). So, before the new one is
started, the old one is told (``announce``: LEAVE_SIGNAL, to handlers whose
stats say they understand it) to leave at the next rebalance instead of
rejoining (``ingest.handler.group_exit``): whichever comes first, its
heartbeat or the SIGTERM, it never rejoins. Where the backend cannot signal one
handler (a Swarm task may run on another node) it is told through Redis, its
leave key, which it reads with its stats each second. Swarm cannot stop a
chosen task either: a scale-down stops one Swarm picks, preferring a task that
is not running. So there the handover waits for the told handler to leave and
exit by itself, then lowers the service, which takes the exited task's slot
before Swarm restarts it. Handlers of versions before all this keep the race.

A change is over once the rebalance has completed (the group Stable, with the
new members and without the old), so the next one never joins into it.

A handler that never joins (crashed, broken image) does not cost the one it
was to replace: past ``join_s`` the old one keeps running and the change is
given up; the rollout's guard and its ``max_wait_s`` take it from there. The
pending change lives in the rollout's state in Redis (``Pending``), so a scaler
restarted mid-change resumes the watch, or finds it done.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from aiokafka.errors import KafkaError
from redis.asyncio import Redis

from core.constants import (
    LEAVE_KEY_FIELD,
    LEAVE_SIGNAL,
    LEAVE_SIGNAL_FIELD,
    REDIS_HANDLER_LEAVE,
    REDIS_HANDLER_STATS,
)
from scaler.backends.base import Backend, BackendError, HandlerInstance
from scaler.lag import GroupInfo

log = logging.getLogger(__name__)

JOINING = "PreparingRebalance"  # the join phase: a leave now is part of the same rebalance
STABLE = "Stable"  # the rebalance completed: every member has its partitions
SETTLE_S = 30.0  # longest wait for that before the next change starts anyway
SETTLE_POLL_S = 0.1
# A leave key not read by then is stale (a handler forgets an announcement after 120 s).
LEAVE_KEY_TTL_S = 120.0
# Where the platform picks what a scale-down stops: longest wait for a told handler to
# leave and exit on its own, so that the scale-down takes its slot and no running one.
EXIT_WAIT_S = 30.0


class GroupReader(Protocol):
    async def group_info(self) -> GroupInfo: ...


@dataclass
class Pending:
    """A change under way: ``new`` (backend ids) started, ``old`` to stop once they joined."""

    new: list[str]
    old: list[str]
    since: float  # wall time the new ones were started
    what: str = "step"  # canary | step (for the log)
    announced: list[str] = field(default_factory=list)  # old ones told to leave (announce)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pending:
        return cls(
            list(d["new"]), list(d["old"]), float(d["since"]), str(d.get("what", "step")),
            list(d.get("announced", [])),
        )  # fmt: skip


async def announce(
    backend: Backend, redis: Redis, old: builtins.list[HandlerInstance]
) -> builtins.list[str]:
    """Tell the old handlers that understand it that their replacement is starting, before
    it starts: each then leaves the group in the rebalance the new one's join opens,
    instead of rejoining it, whoever wins the race between its heartbeat and the SIGTERM
    below. By LEAVE_SIGNAL where the backend can signal one handler, else by its leave
    key in Redis (read with its stats each second, well before the new one has joined).
    Older handlers (their stats name neither) are only stopped."""
    if not old:
        return []
    async with redis.pipeline(transaction=False) as p:
        for h in old:
            p.hmget(REDIS_HANDLER_STATS + h.name, [LEAVE_SIGNAL_FIELD, LEAVE_KEY_FIELD])
        said = await p.execute()
    by_signal = [h.id for h, (sig, _) in zip(old, said, strict=True) if _text(sig) == LEAVE_SIGNAL]
    told: builtins.list[str] = []
    if by_signal:
        try:
            told = await backend.announce_replacement(by_signal)
        except BackendError as e:
            log.warning("could not signal %s (%s); telling them through Redis", by_signal, e)
    by_key = [h for h, (_, key) in zip(old, said, strict=True)
              if h.id not in told and _text(key) == "1"]  # fmt: skip
    if by_key:
        async with redis.pipeline(transaction=False) as p:
            for h in by_key:
                p.set(REDIS_HANDLER_LEAVE + h.name, "1", ex=int(LEAVE_KEY_TTL_S))
            await p.execute()
        told += [h.id for h in by_key]
    return told


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v or "")


@dataclass(frozen=True)
class Outcome:
    joined: bool  # the new ones joined and the old ones were stopped
    detail: str


class Handover:
    """Runs the watch of one pending change at a time; ``advance`` is called once a poll.

    :param poll_s: how often the group is read while a join is awaited; the old
        handler's drain must start well within the others' heartbeat interval.
    """

    def __init__(self, backend: Backend, group: GroupReader, poll_s: float = 0.02) -> None:
        self.backend = backend
        self.group = group
        self.poll_s = poll_s
        self._task: asyncio.Task[Outcome] | None = None
        self._for: Pending | None = None

    async def advance(
        self, p: Pending, instances: builtins.list[HandlerInstance], join_s: float
    ) -> Outcome | None:
        """The change's outcome once it is over, None while it waits for the join."""
        out = await self._advance(p, instances, join_s)
        if out is not None and out.joined:
            log.info("handover (%s): %s replaced %s", p.what, out.detail, p.old)
        elif out is not None:
            log.warning("handover (%s): %s kept running: %s", p.what, p.old, out.detail)
        return out

    async def _advance(
        self, p: Pending, instances: builtins.list[HandlerInstance], join_s: float
    ) -> Outcome | None:
        task = self._task if self._for == p else None
        if task is not None:
            if not task.done():
                return None
            self._task = self._for = None
            try:
                return task.result()
            except (KafkaError, BackendError, OSError) as e:
                log.warning("handover of %s: %r; stopping the old handler(s) anyway", p.old, e)
                await self.backend.remove_ids(p.old)
                return Outcome(True, f"stopped after an error: {e}")
        self.cancel()
        live = {i.id for i in instances}
        if not any(i in live for i in p.old):
            if set(p.old) <= set(p.announced) and not self.backend.stops_chosen:
                # Told, they left and exited by themselves, but their slots are still
                # their service's until it is lowered: Swarm would start them again, of
                # the old version. This poll may be the first to see it (a scaler
                # restarted mid-change, a watch that ended in an error); lowering an
                # already-lowered slot changes nothing (Backend.remove_ids).
                await self.backend.remove_ids(p.old)
                return Outcome(True, "the old handler(s) left and exited; their slots released")
            return Outcome(True, "the old handler(s) are gone")
        names = frozenset(i.name for i in instances if i.id in p.new)
        olds = frozenset(i.name for i in instances if i.id in p.old)
        if not names:
            return Outcome(False, "the new handler exited before it joined")
        deadline = p.since + join_s
        if time.time() > deadline:
            return Outcome(False, f"the new handler did not join within {join_s:g}s")
        self._for = p
        told = set(p.old) <= set(p.announced)
        self._task = asyncio.create_task(self._watch(names, olds, p.old, deadline, join_s, told))
        return None

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = self._for = None

    async def _watch(
        self,
        names: frozenset[str],
        olds: frozenset[str],
        old: list[str],
        deadline: float,
        join_s: float,
        told: bool = False,
    ) -> Outcome:
        while time.time() < deadline:
            info = None
            with contextlib.suppress(KafkaError):
                info = await self.group.group_info()
            if info is not None and names <= info.clients:
                t0 = time.monotonic()
                left = not (olds & info.clients)  # announced, it left without being stopped
                if told and not self.backend.stops_chosen:
                    await self._exited(old)
                await self.backend.remove_ids(old)
                if left:
                    how = "in the rebalance the new one's join opened, the old one left itself"
                elif info.state == JOINING:
                    how = "in the rebalance the new one's join opened"
                else:  # joined and settled before it was seen: one rebalance more
                    how = f"late, after the new one's join had completed ({info.state})"
                drained = time.monotonic() - t0
                settled = await self._settled(names, olds)
                return Outcome(True, f"{how}; drained in {drained:.1f}s; {settled}")
            await asyncio.sleep(self.poll_s)
        return Outcome(False, f"the new handler did not join within {join_s:g}s")

    async def _exited(self, old: list[str]) -> None:
        """Wait for the told handlers to leave the group and exit by themselves (at their
        next heartbeat), so that the scale-down that follows takes their slots."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < EXIT_WAIT_S:
            with contextlib.suppress(BackendError):
                if not set(old) & {i.id for i in await self.backend.list()}:
                    return
            await asyncio.sleep(SETTLE_POLL_S)
        log.warning("handover: %s still running %gs after the new one joined", old, EXIT_WAIT_S)

    async def _settled(self, names: frozenset[str], olds: frozenset[str]) -> str:
        """Wait for the change's rebalance to complete before the next change starts: a
        join while it still collects members would fold two changes into one generation,
        and the next handover would take the rebalance under way for its own."""
        t0 = time.monotonic()
        while (waited := time.monotonic() - t0) < SETTLE_S:
            info = None
            with contextlib.suppress(KafkaError):
                info = await self.group.group_info()
            if (
                info is not None
                and info.state == STABLE
                and names <= info.clients
                and not (olds & info.clients)
            ):
                return f"group stable {waited:.1f}s later"
            await asyncio.sleep(SETTLE_POLL_S)
        log.warning("handover: the group is not stable %gs after the change; going on", SETTLE_S)
        return f"group not stable after {SETTLE_S:g}s"
