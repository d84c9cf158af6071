"""Handlers as local processes: one machine, no Docker (``tickscale up``, tests).

Each handler gets its own metrics port (the lowest free slot from
``base_port``) and log file. A Prometheus file-discovery JSON listing the live
handlers is rewritten on every change, so a local Prometheus finds the
handlers this backend starts the way the compose one finds containers.

Handlers do not depend on the scaler: they run in their own sessions and
nothing ties them to the scaler's life, so a scaler that dies (SIGKILL, out of
memory) costs no ticks. Every handler is recorded in ``fleet-<name>.json`` in
the state directory (``fleetfile``); a scaler starting on that directory
adopts the live ones as its fleet, which it counts, scales from and stops by
pid and signal, whether or not it is their parent. A leader and its standby
share the record, so both see the one fleet.

What stops handlers from outliving everything: a scaler stopped in order
removes them (``stop_handlers_on_exit``, on by default for this backend), and
with ``parent_pid`` (the stack owner, e.g. ``tickscale up``'s, which must be a
child subreaper) each handler is started as that owner's child and drains and
leaves on its own once the owner is gone. Without ``parent_pid`` they run until
a scaler or someone else stops them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from core.constants import LEAVE_SIGNAL
from scaler.backends.base import (
    BackendError,
    BackendHealth,
    HandlerInstance,
    HandlerSpec,
    HandlerVersion,
)
from scaler.backends.fleetfile import Entry, FleetFile, Record, alive, start_ticks

log = logging.getLogger(__name__)

_POLL_S = 0.2  # how often a stopping handler's pid is checked


class ProcessBackend:
    name = "process"
    stops_chosen = True

    def __init__(
        self,
        spec: HandlerSpec,
        *,
        base_port: int = 9300,
        state_dir: Path = Path(".local/scaler"),
        stop_grace_s: float = 30.0,
        name: str = "default",
        host: str = "127.0.0.1",
        parent_pid: int | None = None,
        version: HandlerVersion | None = None,
    ) -> None:
        """
        :param parent_pid: the stack owner the handlers follow (their ``parent_pid``);
            it must be a child subreaper among this process's ancestors
        :param version: what ``add`` starts; default: ``tickscale handler`` of this install
        """
        self.version = version or HandlerVersion("default")
        self.spec = spec
        self.base_port = base_port
        self.state_dir = state_dir
        self.stop_grace_s = stop_grace_s
        self.fleet = name
        self.host = host
        self.parent_pid = parent_pid
        self.targets_path = state_dir / "targets.json"
        self.record = FleetFile(state_dir, name)
        # Children this process started itself (no owner): kept so the event
        # loop's child watcher reaps them when they exit.
        self._children: dict[int, asyncio.subprocess.Process] = {}
        self._lock = asyncio.Lock()
        self._ports_said: set[int] = set()  # taken by other programs, said once each

    async def start(self) -> None:
        if self.parent_pid is not None and self.parent_pid not in _ancestors():
            # Handlers could never be its children: each would leave at once.
            raise BackendError(
                f"handler_parent_pid: process {self.parent_pid} is not an ancestor of this "
                "scaler (it must be the stack owner that started it)"
            )
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        live = await self.list()
        if live:
            log.info(
                "process backend %r: adopted %d running handler(s): %s", self.fleet, len(live),
                ", ".join(f"{h.name} (pid {h.id})" for h in live),
            )  # fmt: skip
        if not self.targets_path.exists():
            self._write_targets()  # Prometheus reads an empty fleet, not an error

    async def close(self) -> None:
        """Handlers keep running: the next scaler on this state directory adopts them."""

    async def retire(self) -> None:
        """Nothing to drop: ``remove`` already waited for the processes."""

    async def list(self) -> builtins.list[HandlerInstance]:
        async with self._lock:
            rec = await asyncio.to_thread(self._update, None)
        return [
            HandlerInstance(str(h.pid), h.name, "running", h.started_at, h.version)
            for h in sorted(rec.handlers, key=lambda h: h.started_at)
        ]

    def set_version(self, version: HandlerVersion) -> None:
        self.version = version

    async def add(self, n: int, version: HandlerVersion | None = None) -> builtins.list[str]:
        if n <= 0:
            return []
        version = version or self.version
        async with self._lock:
            # Reserve slots and names first, under the file lock, then start.
            rec = await asyncio.to_thread(self._update, None)
            slots = self._free_slots({h.slot for h in rec.handlers}, n)
            serials = range(rec.next_serial, rec.next_serial + n)
            started: builtins.list[Entry] = []
            try:
                for slot, serial in zip(slots, serials, strict=True):
                    name = f"handler-{self.fleet}-{serial}"
                    started.append(await self._launch(slot, name, version))
            finally:

                def record(r: Record) -> None:
                    r.next_serial = max(r.next_serial, serials.stop)
                    r.handlers.extend(started)

                try:
                    await asyncio.to_thread(self._update, record)
                except OSError as e:
                    # Unrecorded, they would run where no scaler can count, adopt or stop
                    # them, and the next scale-up would start more (one an attempt, on a
                    # full disk): they go, and the scaler retries with the rest of its loop.
                    for h in started:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(h.pid, signal.SIGTERM)
                    await asyncio.gather(*(self._wait_stopped(h) for h in started))
                    raise BackendError(
                        f"state_dir {self.state_dir}: cannot record the handlers it starts "
                        f"({e.strerror or e}); stopped {len(started)} again"
                    ) from None
        return [str(e.pid) for e in started]

    def _free_slots(self, taken: set[int], n: int) -> builtins.list[int]:
        """The ``n`` lowest slots neither the fleet's nor on a port another process holds.

        A handler's metrics port is its slot's: one another program listens on would end
        every handler started there at once, and the fleet would never grow past it."""
        slots: builtins.list[int] = []
        slot = 0
        while len(slots) < n:
            if slot not in taken:
                port = self.base_port + slot
                if port > 65535:
                    raise BackendError(
                        f"handler_base_port {self.base_port}: no free port for {n} more "
                        f"handler(s) on {self.host} up to 65535"
                    )
                if _port_free(self.host, port):
                    slots.append(slot)
                elif port not in self._ports_said:
                    self._ports_said.add(port)
                    log.warning("port %d (slot %d) cannot be listened on at %s (another "
                                "program holds it?): handlers skip that slot",
                                port, slot, self.host)  # fmt: skip
            slot += 1
        return slots

    async def remove(self, n: int) -> builtins.list[str]:
        if n <= 0:
            return []
        return await self._stop(lambda hs: sorted(hs, key=lambda h: -h.started_at)[:n])

    async def remove_ids(self, ids: builtins.list[str]) -> builtins.list[str]:
        wanted = set(ids)
        if not wanted:
            return []
        return await self._stop(lambda hs: [h for h in hs if str(h.pid) in wanted])

    async def announce_replacement(self, ids: builtins.list[str]) -> builtins.list[str]:
        told = []
        for h in await self.list():  # live ones only: a pid of the record that still runs
            if h.id in ids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(h.id), signal.Signals[LEAVE_SIGNAL])
                    told.append(h.id)
        return told

    async def _stop(
        self, choose: Callable[[builtins.list[Entry]], builtins.list[Entry]]
    ) -> builtins.list[str]:
        """SIGTERM the handlers ``choose`` picks from the record and wait until they exit."""
        async with self._lock:
            victims: builtins.list[Entry] = []

            def take(r: Record) -> None:
                chosen = choose(r.handlers)
                for h in chosen:
                    # Signalled before the record forgets it: a scaler that dies
                    # right after leaves a handler that drains and exits anyway.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(h.pid, signal.SIGTERM)
                victims.extend(chosen)
                r.handlers = [h for h in r.handlers if h not in chosen]

            await asyncio.to_thread(self._update, take)
        await asyncio.gather(*(self._wait_stopped(h) for h in victims))
        return [str(h.pid) for h in victims]

    async def health(self) -> BackendHealth:
        live = await self.list()
        return BackendHealth(True, f"{len(live)} handler processes")

    # ----------------------------------------------------------------------------------

    async def _launch(self, slot: int, name: str, version: HandlerVersion) -> Entry:
        port = self.base_port + slot
        env = {k: v for k, v in os.environ.items() if k != "TICKSCALE_HANDLER_PARENT_PID"}
        env |= self.spec.env() | {
            "TICKSCALE_HANDLER_HANDLER_ID": name,
            "TICKSCALE_HANDLER_VERSION": version.name,
            "TICKSCALE_HANDLER_METRICS_HOST": self.host,
            "TICKSCALE_HANDLER_METRICS_PORT": str(port),
        }
        log_path = self.state_dir / "logs" / f"{name}.log"
        cmd = list(version.command or (sys.executable, "-m", "tickscale", "handler"))
        if self.parent_pid is not None:
            env["TICKSCALE_HANDLER_PARENT_PID"] = str(self.parent_pid)
            launcher = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "scaler.backends.detach", str(log_path), *cmd,
                env=env, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            out, _ = await launcher.communicate()
            if launcher.returncode != 0 or not out.strip().isdigit():
                raise BackendError(f"state_dir: could not start {name} (launcher exit "
                                   f"{launcher.returncode}; see {log_path})")  # fmt: skip
            pid = int(out)
        else:
            with log_path.open("ab") as logf:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, env=env, stdout=logf, stderr=asyncio.subprocess.STDOUT,
                    stdin=asyncio.subprocess.DEVNULL,
                    # Own session: a Ctrl-C meant for the scaler must not reach the
                    # handlers before the scaler drains them in order, and a
                    # signal to the scaler's group must not take them with it.
                    start_new_session=True,
                )  # fmt: skip
            pid = proc.pid
            self._children[pid] = proc
        ticks = start_ticks(pid)
        # A handler that died at once is recorded dead and reported by the next list().
        entry = Entry(
            pid, slot, name, port, time.time(), ticks if ticks is not None else -1, version.name
        )
        log.info("started %s (pid %d, metrics :%d, version %s)", name, pid, port, version.name)
        return entry

    async def _wait_stopped(self, h: Entry) -> None:
        deadline = time.monotonic() + self.stop_grace_s
        while alive(h):
            if time.monotonic() > deadline:
                log.warning("%s did not stop within %.0fs; killing", h.name, self.stop_grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(h.pid, signal.SIGKILL)
                deadline = float("inf")
            await asyncio.sleep(_POLL_S)
        proc = self._children.pop(h.pid, None)
        code = f" (exit {proc.returncode})" if proc is not None else ""
        log.info("stopped %s%s", h.name, code)

    def _update(self, change: Callable[[Record], None] | None) -> Record:
        """Read the record under its lock, drop the dead, apply ``change``, write it back.

        Runs in a worker thread: the lock may be held by another scaler.
        """
        with self.record.locked():
            rec = self.record.read()
            dead = [h for h in rec.handlers if not alive(h)]
            for h in dead:
                log.warning("%s (pid %d) exited on its own", h.name, h.pid)
                self._children.pop(h.pid, None)
            rec.handlers = [h for h in rec.handlers if h not in dead]
            if change is not None:
                change(rec)
            if dead or change is not None:
                self.record.write(rec)
                self._write_targets()
            return rec

    def _write_targets(self) -> None:
        # Every fleet recorded in this directory, so two fleets sharing it (or a
        # leader and its standby) write the same file rather than hide each other.
        groups = []
        for path in sorted(self.state_dir.glob("fleet-*.json")):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                fleet = FleetFile(self.state_dir, path.stem.removeprefix("fleet-")).read()
                groups += [
                    {
                        "targets": [f"{self.host}:{h.port}"],
                        "labels": {"job": "handler", "container": h.name}
                        | ({"version": h.version} if h.version else {}),
                    }
                    for h in sorted(fleet.handlers, key=lambda h: h.slot)
                ]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # A temporary file of its own: two scalers sharing a state directory (a
        # leader and its standby) once renamed each other's and one crashed.
        try:
            fd, name = tempfile.mkstemp(dir=self.state_dir, prefix="targets.", suffix=".tmp")
        except OSError as e:
            self._targets_unwritten(e)
            return
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(groups, indent=1))
            os.replace(name, self.targets_path)  # atomic: Prometheus never reads half a file
        except OSError as e:
            Path(name).unlink(missing_ok=True)
            self._targets_unwritten(e)

    def _targets_unwritten(self, e: OSError) -> None:
        # Only Prometheus reads it: the fleet, recorded, goes on; it is written whole at
        # the next change.
        log.warning("cannot write %s (%s): Prometheus keeps its last list of handlers",
                    self.targets_path, e.strerror or e)  # fmt: skip


def _port_free(host: str, port: int) -> bool:
    """Whether a handler could listen on ``port`` now (bound as its server binds it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ancestors() -> builtins.list[int]:
    pids, pid = [], os.getppid()
    while pid > 1:
        pids.append(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rfind(")") + 2 :].split()[1])
    return pids
