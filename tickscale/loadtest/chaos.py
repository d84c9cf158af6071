"""Faults injected during a replay, each at a time offset from the replay's first message.

``--chaos KIND@OFFSET[:DURATION]`` (repeatable); OFFSET and DURATION in seconds, ``s``/``m``
suffixes allowed, e.g. ``kill-handler@20``, ``redis-stop@30:45``, ``broker-kill@1m:15``.
Several drills may overlap (e.g. ``broker-kill@20`` with ``kill-handler@22``), but not two on
the same service.

- ``kill-handler``: SIGKILL to the longest-running handler process of the run's fleet: a real
  crash, no drain, no commit; its partitions wait for the group's session timeout, then the
  scaler replaces it (its backend reaps the dead process and the count is below the policy's).
- ``scale-in``: the scaler itself removes one handler (SIGTERM, drain, commit, leave) while load
  flows. Mechanism: SIGUSR1 to the scaler lowers its maximum to one below the running count,
  what restarting it with a lower ``--max-handlers`` would do (see ``scaler_proc``). Needs the
  tickscale policy or ``fixed:N``: the reactive baseline's scale-down stabilisation (300 s)
  would outlast most runs.
- ``kill-scaler``: SIGKILL to the run's scaler; after DURATION (default 10 s) the same command
  starts again on the same state directory, as a supervisor would: the handlers should keep
  working meanwhile and the restarted scaler take them over.
- ``broker-restart``: stop the broker (controlled shutdown), wait DURATION (default 60 s),
  start it on the same port and data.
- ``broker-kill``: SIGKILL the broker (no controlled shutdown), start it again after DURATION
  (default 10 s) on the same port and data.
- ``broker-pause``: SIGSTOP the broker for DURATION (default 10 s), then SIGCONT: a hung broker
  whose connections stay open but answer nothing.
- ``redis-stop``: stop Redis for DURATION (default 60 s), then start it. The local Redis comes
  back empty (no persistence), as a replaced replica would; a compose Redis is stopped and
  started through Docker.
- ``redis-kill``: SIGKILL Redis, start it again after DURATION (default 10 s).

The broker drills need a broker this run started (the local target, no ``--bootstrap``); the
Redis drills one it started (no ``--redis``) or the compose stack's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tickscale.loadtest.procs import handler_id, handler_pids, process_state
from tickscale.loadtest.stack import Restartable

DEFAULT_DURATION = {
    "kill-handler": 0.0,
    "scale-in": 0.0,
    "kill-scaler": 10.0,
    "broker-restart": 60.0,
    "broker-kill": 10.0,
    "broker-pause": 10.0,
    "redis-stop": 60.0,
    "redis-kill": 10.0,
}
KINDS = tuple(DEFAULT_DURATION)
# The service each drill acts on (two drills on one service must not overlap).
SERVICE = {
    "kill-handler": "handlers",
    "scale-in": "scaler",
    "kill-scaler": "scaler",
    "broker-restart": "broker",
    "broker-kill": "broker",
    "broker-pause": "broker",
    "redis-stop": "redis",
    "redis-kill": "redis",
}
_SPEC = re.compile(r"^([a-z-]+)@\+?([0-9.]+)([sm]?)(?::([0-9.]+)([sm]?))?$")


@dataclass(frozen=True)
class ChaosSpec:
    kind: str
    at_s: float
    duration_s: float

    def __str__(self) -> str:
        d = f":{self.duration_s:g}" if self.duration_s else ""
        return f"{self.kind}@{self.at_s:g}{d}"


def _seconds(num: str, unit: str) -> float:
    return float(num) * (60.0 if unit == "m" else 1.0)


def parse_chaos(text: str) -> ChaosSpec:
    m = _SPEC.match(text.strip())
    if not m:
        raise ValueError(f"expected KIND@SECONDS[:DURATION], e.g. kill-handler@20, got {text!r}")
    kind = m.group(1)
    if kind not in KINDS:
        raise ValueError(f"unknown chaos {kind!r} (one of {', '.join(KINDS)})")
    at = _seconds(m.group(2), m.group(3))
    dur = DEFAULT_DURATION[kind] if m.group(4) is None else _seconds(m.group(4), m.group(5))
    return ChaosSpec(kind, at, dur)


@dataclass
class ChaosEvent:
    """What a drill did. ``wall``: unix time it started; ``end_wall``: when the fault ended
    (the service back, the scaler restarted), from which recovery is measured."""

    kind: str
    at_s: float
    duration_s: float
    wall: float = 0.0
    end_wall: float = 0.0
    ok: bool = False
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChaosContext:
    """What the drills may act on; None where the load test does not own the thing."""

    scaler: Restartable | None
    broker: Restartable | None
    redis: Restartable | None
    policy: str
    fleet: str = ""  # the scaler's name, which the handler ids carry


def check_options(
    specs: list[ChaosSpec], target: str, bootstrap: str | None, redis: str | None, policy: str
) -> None:
    """The same rules as ``check_allowed``, from the options alone: before anything starts."""
    check_allowed(specs, target == "local" and bootstrap is None, redis is None, policy)


def check_allowed(specs: list[ChaosSpec], owns_broker: bool, owns_redis: bool, policy: str) -> None:
    """ValueError naming the first drill this run cannot perform."""
    for s in specs:
        if SERVICE[s.kind] == "broker" and not owns_broker:
            raise ValueError(
                f"{s.kind} needs the local target with a broker this run starts (no --bootstrap)"
            )
        if SERVICE[s.kind] == "redis" and not owns_redis:
            raise ValueError(f"{s.kind} needs a Redis this run starts (no --redis) or compose's")
        if s.kind == "scale-in" and policy == "reactive":
            raise ValueError(
                "scale-in needs --policy tickscale or fixed:N (the reactive baseline holds "
                "scale-downs for 300 s)"
            )
    by_service: dict[str, list[ChaosSpec]] = {}
    for s in specs:
        by_service.setdefault(SERVICE[s.kind], []).append(s)
    for svc, group in by_service.items():
        group.sort(key=lambda s: s.at_s)
        for a, b in itertools.pairwise(group):
            # A restart takes seconds beyond the duration; a second drill inside it would
            # act on a half-started service.
            if b.at_s < a.at_s + a.duration_s + 5 and svc != "handlers":
                raise ValueError(f"{a} and {b} overlap on the {svc} (leave 5 s between them)")


Drill = Callable[[ChaosSpec, ChaosContext, ChaosEvent], Awaitable[None]]


async def _kill_handler(spec: ChaosSpec, ctx: ChaosContext, ev: ChaosEvent) -> None:
    pids = handler_pids(ctx.fleet)
    if not pids:
        raise RuntimeError("no handler process to kill")
    victim = pids[0]
    name = handler_id(victim)
    os.kill(victim, signal.SIGKILL)
    ev.detail = f"SIGKILL to handler {name or '?'} (pid {victim}; {len(pids)} running)"
    ev.extra["pid"] = victim
    ev.extra["handler"] = name


async def _scale_in(spec: ChaosSpec, ctx: ChaosContext, ev: ChaosEvent) -> None:
    pid = None if ctx.scaler is None else ctx.scaler.pid
    if pid is None:
        raise RuntimeError("the scaler is not running")
    running = len(handler_pids(ctx.fleet))
    ev.extra["running_before"] = running
    os.kill(pid, signal.SIGUSR1)
    ev.detail = (
        f"SIGUSR1 to the scaler (pid {pid}): max lowered to {running - 1}; "
        "removal follows its scale-down rules"
    )


async def _kill_scaler(spec: ChaosSpec, ctx: ChaosContext, ev: ChaosEvent) -> None:
    sc = ctx.scaler
    pid = None if sc is None else sc.pid
    if sc is None or pid is None:
        raise RuntimeError("the scaler is not running")
    before = handler_pids(ctx.fleet)
    await asyncio.to_thread(sc.kill)
    await asyncio.sleep(spec.duration_s)
    alive = [p for p in before if process_state(p) not in (None, "Z")]
    await asyncio.to_thread(sc.start)
    ev.extra |= {"pid": pid, "new_pid": sc.pid, "handlers_at_kill": len(before),
                 "handlers_alive_at_restart": len(alive)}  # fmt: skip
    ev.detail = (
        f"SIGKILL to the scaler (pid {pid}); restarted after {spec.duration_s:g}s as pid "
        f"{sc.pid}; {len(alive)} of its {len(before)} handlers were still running"
    )


def _outage(service: str, how: str) -> Drill:
    """Stop (``stop``) or SIGKILL (``kill``) a service, start it again after the duration."""

    async def drill(spec: ChaosSpec, ctx: ChaosContext, ev: ChaosEvent) -> None:
        svc: Restartable | None = getattr(ctx, service)
        if svc is None:
            raise RuntimeError(f"the {service} is not this run's")
        pid = svc.pid
        await asyncio.to_thread(svc.kill if how == "kill" else svc.stop)
        down = time.time()
        await asyncio.sleep(spec.duration_s)
        await asyncio.to_thread(svc.start)
        ev.extra |= {"pid": pid, "new_pid": svc.pid}
        what = f"SIGKILL to the {service}" if how == "kill" else f"the {service} stopped"
        ev.detail = (
            f"{what} (pid {pid}), started again as pid {svc.pid}; {time.time() - down:.1f} s down"
        )

    return drill


async def _pause_broker(spec: ChaosSpec, ctx: ChaosContext, ev: ChaosEvent) -> None:
    pid = None if ctx.broker is None else ctx.broker.pid
    if pid is None:
        raise RuntimeError("the broker is not running")
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(spec.duration_s)
    finally:
        # Also when the run ends first: a broker left stopped would hang its teardown.
        os.kill(pid, signal.SIGCONT)
    ev.extra["pid"] = pid
    ev.detail = f"SIGSTOP to the broker (pid {pid}) for {spec.duration_s:g}s, then SIGCONT"


_DRILLS: dict[str, Drill] = {
    "kill-handler": _kill_handler,
    "scale-in": _scale_in,
    "kill-scaler": _kill_scaler,
    "broker-restart": _outage("broker", "stop"),
    "broker-kill": _outage("broker", "kill"),
    "broker-pause": _pause_broker,
    "redis-stop": _outage("redis", "stop"),
    "redis-kill": _outage("redis", "kill"),
}


async def perform(spec: ChaosSpec, ctx: ChaosContext, ev: ChaosEvent) -> None:
    ev.wall = time.time()
    try:
        await _DRILLS[spec.kind](spec, ctx, ev)
        ev.ok = True
    except asyncio.CancelledError:
        ev.detail = (ev.detail + "; " if ev.detail else "") + "cut short: the run ended first"
        raise
    except Exception as e:  # a drill that fails is a finding for the report, not a crash
        ev.ok = False
        ev.detail = f"failed: {e!r}"
    finally:
        ev.end_wall = time.time()


async def run_all(
    specs: list[ChaosSpec],
    ctx: ChaosContext,
    t0: float,
    on_event: Callable[[ChaosEvent], None] | None = None,
    events: list[ChaosEvent] | None = None,
) -> list[ChaosEvent]:
    """Run every drill at ``t0 + at_s`` (unix time); returns them in schedule order.

    ``events``, when given, is filled in place, so a caller sees drills in progress (a
    started one has ``wall`` set, a finished one ``end_wall``).
    """
    if events is None:
        events = []
    events[:] = [ChaosEvent(s.kind, s.at_s, s.duration_s) for s in specs]

    async def one(spec: ChaosSpec, ev: ChaosEvent) -> None:
        await asyncio.sleep(max(0.0, t0 + spec.at_s - time.time()))
        await perform(spec, ctx, ev)
        if on_event is not None:
            with contextlib.suppress(Exception):
                on_event(ev)

    await asyncio.gather(*(one(s, e) for s, e in zip(specs, events, strict=True)))
    return events
