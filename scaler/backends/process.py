"""Handlers as local child processes: one machine, no Docker (``tickscale up``, tests).

Each handler gets its own metrics port (the lowest free slot from
``base_port``) and log file. A Prometheus file-discovery JSON listing the live
handlers is rewritten on every change, so a local Prometheus finds the
handlers this backend starts the way the compose one finds containers. Of two
scalers sharing a state directory, only the one that has started handlers
writes it.

Children belong to the scaler: ``close()`` stops them (SIGTERM, grace, then
SIGKILL). A scaler that dies without ``close()`` (SIGKILL, out of memory)
cannot stop them, so each child watches its parent and drains and leaves on
its own within a second of the scaler's death. A restarted scaler starts fresh
ones; adoption is a container backend's job.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scaler.backends.base import BackendHealth, HandlerInstance, HandlerSpec

log = logging.getLogger(__name__)


@dataclass
class _Child:
    slot: int
    name: str
    port: int
    proc: asyncio.subprocess.Process
    started_at: float


class ProcessBackend:
    name = "process"

    def __init__(
        self,
        spec: HandlerSpec,
        *,
        base_port: int = 9300,
        state_dir: Path = Path(".local/scaler"),
        stop_grace_s: float = 30.0,
        name: str = "default",
        host: str = "127.0.0.1",
    ) -> None:
        self.spec = spec
        self.base_port = base_port
        self.state_dir = state_dir
        self.stop_grace_s = stop_grace_s
        self.fleet = name
        self.host = host
        self.targets_path = state_dir / "targets.json"
        self._children: dict[int, _Child] = {}  # slot -> child
        self._serial = 0  # handlers started so far, for their names

    async def start(self) -> None:
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        if not self.targets_path.exists():
            self._write_targets(force=True)  # Prometheus reads an empty fleet, not an error

    async def close(self) -> None:
        await self._stop_children(list(self._children.values()))
        self._write_targets()

    async def retire(self) -> None:
        """Nothing to drop: ``remove`` already waited for the processes."""

    async def list(self) -> builtins.list[HandlerInstance]:
        self._reap()
        return [
            HandlerInstance(str(c.proc.pid), c.name, "running", c.started_at)
            for c in sorted(self._children.values(), key=lambda c: c.started_at)
        ]

    async def add(self, n: int) -> builtins.list[str]:
        started = []
        for _ in range(n):
            slot = next(i for i in range(len(self._children) + 1) if i not in self._children)
            self._serial += 1
            name = f"handler-{self.fleet}-{self._serial}"
            port = self.base_port + slot
            env = os.environ | self.spec.env() | {
                "TICKSCALE_HANDLER_HANDLER_ID": name,
                "TICKSCALE_HANDLER_METRICS_HOST": self.host,
                "TICKSCALE_HANDLER_METRICS_PORT": str(port),
                "TICKSCALE_HANDLER_PARENT_PID": str(os.getpid()),
            }  # fmt: skip
            logf = (self.state_dir / "logs" / f"{name}.log").open("ab")
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tickscale", "handler",
                    env=env, stdout=logf, stderr=asyncio.subprocess.STDOUT,
                    stdin=asyncio.subprocess.DEVNULL,
                    # Own process group: a Ctrl-C meant for the scaler must not
                    # reach the handlers before the scaler drains them in order.
                    start_new_session=True,
                )  # fmt: skip
            finally:
                logf.close()
            self._children[slot] = _Child(slot, name, port, proc, time.time())
            started.append(str(proc.pid))
            log.info("started %s (pid %d, metrics :%d)", name, proc.pid, port)
        self._write_targets()
        return started

    async def remove(self, n: int) -> builtins.list[str]:
        self._reap()
        youngest = sorted(self._children.values(), key=lambda c: -c.started_at)[:n]
        await self._stop_children(youngest)
        self._write_targets()
        return [str(c.proc.pid) for c in youngest]

    async def health(self) -> BackendHealth:
        self._reap()
        return BackendHealth(True, f"{len(self._children)} handler processes")

    async def _stop_children(self, children: builtins.list[_Child]) -> None:
        async def stop(c: _Child) -> None:
            if c.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(c.proc.wait(), self.stop_grace_s)
                except TimeoutError:
                    log.warning("%s did not stop within %.0fs; killing", c.name, self.stop_grace_s)
                    with contextlib.suppress(ProcessLookupError):
                        c.proc.kill()
                    await c.proc.wait()
            log.info("stopped %s (exit %s)", c.name, c.proc.returncode)
            self._children.pop(c.slot, None)

        await asyncio.gather(*(stop(c) for c in children))

    def _reap(self) -> None:
        for slot, c in builtins.list(self._children.items()):
            if c.proc.returncode is not None:
                log.warning("%s exited on its own (code %s)", c.name, c.proc.returncode)
                del self._children[slot]
                self._write_targets()

    def _write_targets(self, force: bool = False) -> None:
        # A leader and its standby share one state directory and so one targets
        # file: only a backend that has started handlers may rewrite it, or a
        # standby starting or stopping would hide the leader's fleet from Prometheus.
        if not (self._serial or force):
            return
        groups = [
            {
                "targets": [f"{self.host}:{c.port}"],
                "labels": {"job": "handler", "container": c.name},
            }
            for c in sorted(self._children.values(), key=lambda c: c.slot)
        ]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # A temporary file of its own: two scalers sharing a state directory (a
        # leader and its standby) once renamed each other's and one crashed.
        fd, name = tempfile.mkstemp(dir=self.state_dir, prefix="targets.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(groups, indent=1))
        os.replace(name, self.targets_path)  # atomic: Prometheus never reads half a file
