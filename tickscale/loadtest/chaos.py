"""Faults injected during a replay, each at a time offset from the replay's first message.

``--chaos KIND@OFFSET[:DURATION]`` (repeatable); OFFSET and DURATION in seconds, ``s``/``m``
suffixes allowed, e.g. ``kill-handler@20``, ``redis-stop@30:45``, ``broker-restart@1m``.

- ``kill-handler``: SIGKILL to the longest-running handler process of the run's scaler: a real
  crash, no drain, no commit; its partitions wait for the group's session timeout, then the
  scaler replaces it (its backend reaps the dead process and the count is below the policy's).
- ``scale-in``: the scaler itself removes one handler (SIGTERM, drain, commit, leave) while load
  flows. Mechanism: SIGUSR1 to the scaler lowers its maximum to one below the running count,
  what restarting it with a lower ``--max-handlers`` would do (see ``scaler_proc`` for why a
  restart cannot be used with the process backend); the policy removes one after its
  scale-down window. Needs the tickscale policy or ``fixed:N``: the reactive baseline's
  scale-down stabilisation (300 s) would outlast most runs.
- ``broker-restart``: stop the broker (controlled shutdown), wait DURATION (default 0), start it
  on the same port and data. Only when the load test started the broker.
- ``redis-stop``: stop Redis for DURATION (default 60 s), then start it. The local Redis comes
  back empty (no persistence), as a replaced replica would; a compose Redis is stopped and
  started through Docker. Not possible with a Redis given by ``--redis``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tickscale.loadtest.stack import Restartable

KINDS = ("kill-handler", "scale-in", "broker-restart", "redis-stop")
DEFAULT_DURATION = {"kill-handler": 0.0, "scale-in": 0.0, "broker-restart": 0.0, "redis-stop": 60.0}
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
    """What a drill did. ``wall``/``end_wall``: unix times it started and finished."""

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


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc: the handlers are the scaler's children)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may contain spaces.
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(d.name))
    return out


def _start_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[19])


def _handler_id(pid: int) -> str:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return ""
    for kv in env:
        if kv.startswith(b"TICKSCALE_HANDLER_HANDLER_ID="):
            return kv.split(b"=", 1)[1].decode()
    return ""


def handler_pids(scaler_pid: int) -> list[int]:
    """The scaler's live handler processes, longest-running first."""
    pids = []
    for pid in _children(scaler_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"handler" in cmd and b"tickscale" in cmd:
                pids.append((_start_ticks(pid), pid))
        except OSError:
            continue
    return [p for _, p in sorted(pids)]


@dataclass
class ChaosContext:
    """What the drills may act on; None where the load test does not own the thing."""

    scaler_pid: Callable[[], int | None]
    broker: Restartable | None
    redis: Restartable | None
    policy: str


def check_options(
    specs: list[ChaosSpec], target: str, bootstrap: str | None, redis: str | None, policy: str
) -> None:
    """The same rules as ``check_allowed``, from the options alone: before anything starts."""
    owns_broker = target == "local" and bootstrap is None
    owns_redis = redis is None
    ctx = ChaosContext(lambda: None, _Placeholder() if owns_broker else None,
                       _Placeholder() if owns_redis else None, policy)  # fmt: skip
    check_allowed(specs, ctx)


class _Placeholder:
    def stop(self) -> None: ...

    def start(self) -> object: ...


def check_allowed(specs: list[ChaosSpec], ctx: ChaosContext) -> None:
    """ValueError naming the first drill this run cannot perform."""
    for s in specs:
        if s.kind == "broker-restart" and ctx.broker is None:
            raise ValueError(
                "broker-restart needs the local target with a broker this run starts "
                "(no --bootstrap)"
            )
        if s.kind == "redis-stop" and ctx.redis is None:
            raise ValueError("redis-stop needs a Redis this run starts (no --redis) or compose's")
        if s.kind == "scale-in" and ctx.policy == "reactive":
            raise ValueError(
                "scale-in needs --policy tickscale or fixed:N (the reactive baseline holds "
                "scale-downs for 300 s)"
            )


async def perform(spec: ChaosSpec, ctx: ChaosContext, ev: ChaosEvent) -> None:
    ev.wall = time.time()
    try:
        if spec.kind == "kill-handler":
            await _kill_handler(ctx, ev)
        elif spec.kind == "scale-in":
            pid = ctx.scaler_pid()
            if pid is None:
                raise RuntimeError("the scaler is not running")
            ev.extra["running_before"] = len(handler_pids(pid))
            os.kill(pid, signal.SIGUSR1)
            ev.ok = True
            ev.detail = (
                f"SIGUSR1 to the scaler (pid {pid}): max lowered to "
                f"{ev.extra['running_before'] - 1}; removal follows its scale-down window"
            )
        elif spec.kind == "broker-restart":
            assert ctx.broker is not None
            await asyncio.to_thread(ctx.broker.stop)
            await asyncio.sleep(spec.duration_s)
            await asyncio.to_thread(ctx.broker.start)
            ev.ok = True
            ev.detail = f"broker stopped and started ({time.time() - ev.wall:.1f} s down)"
        elif spec.kind == "redis-stop":
            assert ctx.redis is not None
            await asyncio.to_thread(ctx.redis.stop)
            await asyncio.sleep(spec.duration_s)
            await asyncio.to_thread(ctx.redis.start)
            ev.ok = True
            ev.detail = f"Redis stopped for {time.time() - ev.wall:.1f} s"
    except Exception as e:  # a drill that fails is a finding for the report, not a crash
        ev.ok = False
        ev.detail = f"failed: {e!r}"
    finally:
        ev.end_wall = time.time()


async def _kill_handler(ctx: ChaosContext, ev: ChaosEvent) -> None:
    pid = ctx.scaler_pid()
    if pid is None:
        raise RuntimeError("the scaler is not running")
    pids = handler_pids(pid)
    if not pids:
        raise RuntimeError("no handler process to kill")
    victim = pids[0]
    name = _handler_id(victim)
    os.kill(victim, signal.SIGKILL)
    ev.ok = True
    ev.detail = f"SIGKILL to handler {name or '?'} (pid {victim}; {len(pids)} running)"
    ev.extra["pid"] = victim
    ev.extra["handler"] = name


async def run_all(
    specs: list[ChaosSpec],
    ctx: ChaosContext,
    t0: float,
    on_event: Callable[[ChaosEvent], None] | None = None,
) -> list[ChaosEvent]:
    """Run every drill at ``t0 + at_s`` (unix time); returns them in schedule order."""
    events = [ChaosEvent(s.kind, s.at_s, s.duration_s) for s in specs]

    async def one(spec: ChaosSpec, ev: ChaosEvent) -> None:
        await asyncio.sleep(max(0.0, t0 + spec.at_s - time.time()))
        await perform(spec, ctx, ev)
        if on_event is not None:
            with contextlib.suppress(Exception):
                on_event(ev)

    await asyncio.gather(*(one(s, e) for s, e in zip(specs, events, strict=True)))
    return events
