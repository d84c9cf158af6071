"""``--rollout VERSION@SECONDS``: a handler rollout in the middle of a replayed day.

At SECONDS after the replay's first message the run asks its own scaler for a
rollout of VERSION (local target, process backend: a command line; compose: an
image the gate admits), exactly as ``tickscale rollout`` does, and follows the
rollout's steps in the audit stream until it is promoted or rolled back. The
result names the outcome, the reason and each step with its time from the
replay's start; the ledger of the run covers the rollout like any drill.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shlex
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from core.constants import REDIS_SCALER_EVENTS
from scaler.audit import decode_event
from scaler.backends.base import HandlerVersion
from scaler.rollout_state import RolloutRequest, RolloutStore

_SPEC = re.compile(r"^(.+)@\+?([0-9.]+)([sm]?)$")
_ENDS = ("promoted", "rolled_back", "rejected")


@dataclass(frozen=True)
class RolloutPlan:
    version: HandlerVersion
    at_s: float
    guard: str = ""


def parse_rollout(text: str, target: str, guard: str = "") -> RolloutPlan:
    """``VERSION@S`` (``s``/``m`` suffix allowed); ValueError naming what is wrong."""
    m = _SPEC.match(text.strip())
    if not m:
        raise ValueError(f"{text!r}: expected VERSION@SECONDS, e.g. tickscale:v2@30")
    what, at = m.group(1).strip(), float(m.group(2)) * (60 if m.group(3) == "m" else 1)
    if target == "local":
        argv = tuple(shlex.split(what))
        if not argv:
            raise ValueError(f"{text!r}: empty command line")
        name = "cmd-" + hashlib.sha1(" ".join(argv).encode()).hexdigest()[:8]
        return RolloutPlan(HandlerVersion(name, command=argv), at, guard)
    return RolloutPlan(HandlerVersion(what, image=what), at, guard)


async def run_rollout(plan: RolloutPlan, redis_url: str, fleet: str, t0: float) -> dict[str, Any]:
    """Request the rollout at ``t0 + plan.at_s`` (wall) and follow it to its end."""
    await asyncio.sleep(max(0.0, t0 + plan.at_s - time.time()))
    redis = Redis.from_url(redis_url, socket_timeout=10)
    stream = f"{REDIS_SCALER_EVENTS}:{fleet}"
    steps: list[dict[str, Any]] = []
    try:
        last = await redis.xrevrange(stream, count=1)
        since: Any = last[0][0] if last else "0-0"
        req = RolloutRequest(plan.version, plan.guard)
        await RolloutStore(redis, fleet).request(req)
        while not steps or steps[-1]["event"] not in _ENDS:
            got: Any = await redis.xread({stream: since}, block=1000, count=100)
            for _s, entries in got or []:
                for rid, fields in entries:
                    since = rid
                    e = decode_event(fields)
                    if e["kind"] == "rollout" and e.get("rollout") == req.id:
                        steps.append({"event": e["event"], "at_s": round(e["time"] - t0, 1),
                                      "reason": e.get("reason", "")})  # fmt: skip
    finally:
        await redis.aclose()
    end = steps[-1]
    return {"version": plan.version.name, "requested_at_s": plan.at_s,
            "outcome": end["event"], "reason": end["reason"], "steps": steps}  # fmt: skip


def start_rollout(
    plan: RolloutPlan | None, redis_url: str, fleet: str, first: asyncio.Event, clock: Any
) -> asyncio.Task[dict[str, Any]] | None:
    """The drill as a task that starts counting at the replay's first message (``first``;
    ``clock.walls[0]`` is its wall time)."""
    if plan is None:
        return None

    async def from_first_message() -> dict[str, Any]:
        await first.wait()
        return await run_rollout(plan, redis_url, fleet, clock.walls[0])

    return asyncio.create_task(from_first_message())


def rollout_line(r: dict[str, Any]) -> str:
    """One line for the console: what was rolled out, when, how it ended and why."""
    steps = ", ".join(f"{s['event']} +{s['at_s']:.0f}s" for s in r["steps"])
    why = f" ({r['reason']})" if r["reason"] else ""
    return f"rollout of {r['version']} at +{r['requested_at_s']:.0f}s: {r['outcome']}{why}; {steps}"
