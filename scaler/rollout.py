"""Handler rollouts, driven by the scaler's loop: canary, guard, promote or roll back.

The leading scaler calls ``step`` once a poll, before it scales. Each call reads
the state from Redis (``rollout_state``), so a scaler that took over, or was
restarted, mid-rollout carries on with it. One call makes at most one change
to the fleet, and a change that replaces a handler is one rebalance
(``scaler.handover``): the new handler starts first, and the old one gets its
SIGTERM (it drains and commits) only once the new one's join has opened a
rebalance, so it leaves in that same one; the change may span several polls,
during which the policy leaves the fleet alone:

- a request starts one canary of the new version, in the slot of the
  youngest old handler; beside a fleet of one it runs as an extra, so there is
  a current version to compare it with;
- while the canary runs, the guard (``scaler.guard``) compares it with the
  current version; past its window within the thresholds, the rollout promotes,
  outside any, it rolls back at once;
- promotion replaces one old handler a step, once the last new one reports,
  until none is left;
- rolling back stops every handler of the new version and starts as many old
  ones in their place, in one step.

Meanwhile the policy keeps the fleet's size: new handlers come from the current
version until the promotion starts, and scale-in (``victims``) never stops the
canary or the last old handler it is compared with.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from typing import Any

from redis.asyncio import Redis

from scaler.audit import AuditLog
from scaler.backends.base import Backend, BackendError, HandlerInstance, HandlerVersion
from scaler.guard import Figures, GuardConfig, GuardError, enough_records, judge, read_figures
from scaler.handover import GroupReader, Handover, Pending, announce
from scaler.rollout_state import RolloutRequest, RolloutState, RolloutStore

log = logging.getLogger(__name__)


Detail = dict[str, Any] | None  # an audit event's figures


class RolloutController:
    def __init__(
        self, *, backend: Backend, redis: Redis, store: RolloutStore, audit: AuditLog,
        scaler_id: str, guard: GuardConfig, group: GroupReader,
    ) -> None:  # fmt: skip
        self.backend = backend
        self.handover = Handover(backend, group)
        self.redis = redis
        self.store = store
        self.audit = audit
        self.scaler_id = scaler_id
        self.guard = guard
        self.state = RolloutState()

    async def start(self) -> None:
        self._sync(await self.store.load())

    def _sync(self, st: RolloutState) -> None:
        """New handlers are of the version being promoted, else of the one a rollout in
        progress started from, else of the one promoted last; a scaler that was standby
        while the leader promoted learns it here."""
        self.state = st
        if st.phase == "promoting":
            v = st.version("target")
        elif st.active:
            v = st.version("previous")
        else:
            v = st.version("current")
        if v is not None and v != self.backend.version:
            log.info("handlers start as %s (rollout %s, %s)", v.name, st.id, st.phase)
            self.backend.set_version(v)

    # The loop's entry point ---------------------------------------------------------

    async def step(self, instances: builtins.list[HandlerInstance], market_s: float) -> bool:
        """Advance the rollout by at most one change; True if the fleet changed or is
        changing (the policy then waits for the next poll)."""
        st = await self.store.load()
        self._sync(st)
        abort = await self.store.take_abort()
        if not st.active:
            req = await self.store.take_request()
            return await self._begin(st, req, instances) if req else False
        if abort and st.phase != "rolling_back":
            await self._fail(st, "aborted by hand (tickscale rollout --abort)")
        if st.handover and st.phase != "rolling_back":
            return await self._hand_over(st, instances)
        if st.phase == "canary":
            return await self._watch(st, instances, market_s)
        if st.phase == "promoting":
            return await self._promote(st, instances)
        return await self._roll_back(st, instances)

    def victims(self, instances: builtins.list[HandlerInstance], n: int) -> builtins.list[str]:
        """Whom scale-in stops during a rollout: old handlers, youngest first, never the
        canary nor the last old one while the canary runs; new ones last."""
        target = self.state.target_name
        old = [i for i in instances if i.version != target][::-1]
        new = [i for i in instances if i.version == target][::-1]
        if self.state.phase == "canary":
            pool = old[: max(0, len(old) - 1)]
        elif self.state.phase == "promoting":
            pool = old + new
        else:
            pool = new + old
        return [i.id for i in pool[:n]]

    @property
    def active(self) -> bool:
        return self.state.active

    # Transitions ----------------------------------------------------------------------

    async def _begin(
        self, st: RolloutState, req: RolloutRequest, instances: builtins.list[HandlerInstance]
    ) -> bool:
        v, cur = req.version, self.backend.version
        why = _refuse(self.backend.name, v, cur, instances)
        try:
            guard = GuardConfig.parse(req.guard, self.guard)
        except GuardError as e:
            why = why or f"--guard: {e}"
        if why:
            await self.audit.rollout(self.scaler_id, req.id, "rejected", v.name, why)
            return False
        old = [i for i in instances if i.version != v.name]
        new = RolloutState(
            "canary", req.id, v.to_dict(), cur.to_dict(), st.current, guard.to_dict(),
            extra=len(old) < 2, started_wall=time.time(),
        )  # fmt: skip
        await self.store.save(new)  # first: a scaler dying right after finds the canary
        self.state = new
        slot = [] if new.extra else [old[-1].id]
        told = await announce(self.backend, self.redis, old[-1:] if slot else [])
        try:
            ids = await self.backend.add(1, v)
        except BackendError as e:
            await self._fail(new, f"the canary could not start: {e}")
            return True
        new.canary_id = ids[0] if ids else None
        if slot and ids:  # the slot's handler leaves once the canary has joined
            new.handover = Pending(ids, slot, time.time(), "canary", told).to_dict()
        await self.store.save(new)
        detail = {"canary": new.canary_id, "replaced": slot, "fleet": len(instances),
                  "from": cur.name, "guard": guard.to_dict()}  # fmt: skip
        await self._event(new, "canary", "one handler of the new version started", detail)
        if new.handover:
            await self._hand_over(new, await self.backend.list())
        return True

    async def _watch(
        self, st: RolloutState, instances: builtins.list[HandlerInstance], market_s: float
    ) -> bool:
        cfg = GuardConfig(**st.guard)  # type: ignore[arg-type]
        target = self.state.target_name
        canary = next((i for i in instances if i.id == st.canary_id), None)
        if canary is None:
            canary = next((i for i in instances if i.version == target), None)
        if canary is None:
            await self._fail(st, f"canary restarts 1 > {cfg.restarts}: the canary exited")
            return await self._roll_back(st, instances)
        old = [i for i in instances if i.version != target]
        figs = await read_figures(self.redis, [i.name for i in instances])
        now = time.time()
        if canary.name not in figs:
            if now - st.started_wall > cfg.max_wait_s:
                await self._fail(st, f"the canary did not report within {cfg.max_wait_s:g}s")
                return await self._roll_back(st, instances)
            return False
        if st.window_market is None:
            return await self._open_window(st, cfg, figs, market_s)
        c, o = Figures(), Figures()
        c.add(figs[canary.name], st.baseline.get(canary.name))
        for i in old:
            if i.name in figs:
                o.add(figs[i.name], st.baseline.get(i.name))
        done = market_s - st.window_market >= cfg.window_s
        enough = enough_records(cfg, c, o)
        why = judge(cfg, c, o, 0, final=done) if enough else None
        detail: dict[str, Any] = {"canary": c.summary(), "current": o.summary()}
        if why:
            await self._fail(st, why, detail)
            return await self._roll_back(st, instances)
        if not done or not enough:
            if now - st.window_wall > cfg.max_wait_s:
                await self._fail(
                    st,
                    f"too few records for a verdict: canary {c.records:.0f}, current "
                    f"{o.records:.0f} (min_records {cfg.min_records})",
                    detail,
                )
                return await self._roll_back(st, instances)
            return False
        st.phase = "promoting"
        self.backend.set_version(HandlerVersion.from_dict(st.target or {}))
        await self.store.save(st)
        await self._event(st, "passed", "within the guard; promoting", detail)
        return await self._promote(st, instances)

    async def _open_window(
        self, st: RolloutState, cfg: GuardConfig, figs: dict[str, Any], market_s: float
    ) -> bool:
        """After the canary's warm-up: every handler's figures now are the baseline."""
        now = time.time()
        if not st.ready_wall:
            st.ready_wall = now
            await self.store.save(st)
        if now - st.ready_wall < cfg.warmup_s:
            return False
        st.window_market, st.window_wall, st.baseline = market_s, now, figs
        await self.store.save(st)
        await self._event(st, "window", f"guard window of {cfg.window_s:g}s opened")
        return False

    async def _promote(self, st: RolloutState, instances: builtins.list[HandlerInstance]) -> bool:
        target = self.state.target_name
        old = [i for i in instances if i.version != target]
        new = [i for i in instances if i.version == target]
        if not old:
            st.phase, st.outcome, st.current = "done", "promoted", st.target
            await self.store.save(st)
            await self._event(st, "promoted", f"every handler runs {target}", {"fleet": len(new)})
            return False
        step_s = float(st.guard.get("step_s", self.guard.step_s))
        if time.time() - st.last_step_wall < step_s:
            return False
        figs = await read_figures(self.redis, [i.name for i in new])
        if len(figs) < len(new):
            return False  # the last one started is not up yet: one rebalance at a time
        victim = old[-1]
        # Beside a fleet of one, the canary was an extra: the last old one goes unreplaced.
        n_add = 0 if st.extra and len(old) == 1 else 1
        st.last_step_wall = time.time()
        if n_add:  # the victim leaves once the new one has joined
            told = await announce(self.backend, self.redis, [victim])
            ids = await self.backend.add(n_add, HandlerVersion.from_dict(st.target or {}))
            st.handover = Pending(ids, [victim.id], time.time(), "step", told).to_dict()
        else:  # a leave alone is one rebalance
            await self.backend.remove_ids([victim.id])
        await self.store.save(st)
        detail = {"stopping": victim.name, "started": n_add, "old_left": len(old) - 1}
        await self._event(st, "step", f"replacing {victim.name}", detail)
        if st.handover:
            await self._hand_over(st, await self.backend.list())
        return True

    async def _hand_over(self, st: RolloutState, instances: builtins.list[HandlerInstance]) -> bool:
        """Follow the change under way; once it is over, the rollout goes on."""
        p = Pending.from_dict(st.handover or {})
        join_s = float(st.guard.get("join_s", self.guard.join_s))
        out = await self.handover.advance(p, instances, join_s)
        if out is not None:
            st.handover = None
            # A canary whose slot's handler stayed runs beside it, as an extra.
            st.extra = st.extra or (not out.joined and p.what == "canary")
            await self.store.save(st)
        return True

    async def _roll_back(self, st: RolloutState, instances: builtins.list[HandlerInstance]) -> bool:
        target = self.state.target_name
        new = [i for i in instances if i.version == target]
        self.handover.cancel()  # a handler still waiting for its replacement stays
        waiting = Pending.from_dict(st.handover).old if st.handover else []
        kept = len({i.id for i in instances} & set(waiting))
        n_old = max(0, len(new) - (1 if st.extra else 0) - kept)
        await asyncio.gather(
            self.backend.add(n_old, self.backend.version),
            self.backend.remove_ids([i.id for i in new]),
        )
        st.phase, st.outcome, st.handover = "done", "rolled_back", None
        await self.store.save(st)
        detail = {"stopped": [i.name for i in new], "started": n_old}
        await self._event(st, "rolled_back", st.reason, detail)
        return bool(new) or n_old > 0

    async def _fail(self, st: RolloutState, reason: str, detail: Detail = None) -> None:
        """Enter rolling_back: from now on new handlers are of the previous version."""
        prev = st.version("previous")
        if prev is not None:
            self.backend.set_version(prev)
        st.phase, st.reason = "rolling_back", reason
        await self.store.save(st)
        await self._event(st, "rolling_back", reason, detail)

    async def _event(self, st: RolloutState, event: str, why: str, detail: Detail = None) -> None:
        name = self.state.target_name
        await self.audit.rollout(self.scaler_id, st.id, event, name, why, detail)


def _refuse(
    backend: str, v: HandlerVersion, cur: HandlerVersion, instances: builtins.list[HandlerInstance]
) -> str:
    if v.name == cur.name:
        return f"the handlers already run {v.name}"
    if backend == "process" and not v.command:
        return "the process backend rolls out a command line (--command), not an image"
    if backend != "process" and not v.image:
        return f"the {backend} backend rolls out an image (--image)"
    if not instances:
        return "no handlers are running to compare the canary with"
    return ""
