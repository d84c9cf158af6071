"""The lifecycle every local server shares: Kafka, Redis and Prometheus.

A subclass says how to prepare its directory, which command to run and when
it is ready; this base starts the process in its own directory with its log
file, waits for readiness against a deadline, and stops it with SIGTERM, then
SIGKILL after a grace. ``with`` and ``async with`` run start and close.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from tickscale.localstack import proc as _proc
from tickscale.localstack.net import HOST, free_port, wait_for_port_closed


class LocalService:
    """One child server on ``host:port``, fixed for its whole life.

    The port is chosen at construction so ``restart()`` comes back on the same
    address, as a real bounce would. A ``work_dir`` left to the default is a
    fresh temporary directory that ``close()`` removes; one passed in is kept.
    """

    #: Used in messages and for the default temporary directory's name.
    name: ClassVar[str] = "service"
    #: Seconds ``start`` waits for readiness unless told otherwise.
    start_timeout: float = 30.0
    #: Seconds between SIGTERM and SIGKILL unless told otherwise.
    stop_grace: ClassVar[float] = 10.0

    def __init__(self, port: int = 0, host: str = HOST, work_dir: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = work_dir is None
        # Absolute: the server runs with its directory as cwd, so a relative path
        # in its command line or config would point inside itself.
        chosen = work_dir or tempfile.mkdtemp(prefix=f"tickscale-{self.name}-")
        self.work_dir = Path(chosen).absolute()
        self._proc: subprocess.Popen[bytes] | None = None
        # start/stop may come from a worker thread (astart) while a drill or a
        # fixture calls them from another; one lifecycle step at a time.
        self._lock = threading.Lock()
        self.last_start_seconds: float | None = None

    # -- what a subclass provides -----------------------------------------

    @property
    def log_path(self) -> Path:
        return self.work_dir / f"{self.name}.log"

    @property
    def spawn_log(self) -> Path:
        """Where the child's stdout and stderr go (the log, unless it writes its own)."""
        return self.log_path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _prepare(self) -> None:
        """Check prerequisites and write config files before each start."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """True once the server answers; polled until the start deadline."""
        raise NotImplementedError

    def _diagnostics(self) -> str:
        """What to show when a start fails: by default the log's last lines."""
        return _proc.tail(self.log_path)

    def _logs(self) -> list[Path]:
        """The files a failure message points at."""
        logs = [self.log_path]
        return logs if self.spawn_log == self.log_path else [*logs, self.spawn_log]

    # -- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The live process's id; None when stopped or crashed."""
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, timeout: float | None = None) -> Self:
        with self._lock:
            if self.running:
                return self
            t0 = time.monotonic()
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self._prepare()
            self._proc = _proc.spawn(self._command(), self.spawn_log, cwd=self.work_dir)
            try:
                self._wait_ready(self._proc, t0 + (timeout or self.start_timeout))
            except BaseException:
                self._release(self.stop_grace, kill=False)
                raise
            self.last_start_seconds = time.monotonic() - t0
            return self

    def _wait_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        see = " and ".join(str(p) for p in self._logs())
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {proc.returncode} during startup; "
                    f"see {see}\n{self._diagnostics()}"
                )
            if self._ready():
                return
            time.sleep(0.2)
        raise TimeoutError(
            f"{self.name} on {self.address} not ready in time; see {see}\n{self._diagnostics()}"
        )

    def _release(self, timeout: float, kill: bool) -> None:
        if self._proc is None:
            return
        _proc.stop(self._proc, timeout=timeout, kill=kill)
        self._proc = None
        # The next start() binds the same port; make sure the old process let go.
        with contextlib.suppress(TimeoutError):
            wait_for_port_closed(self.host, self.port, timeout=5)

    def stop(self, timeout: float | None = None, kill: bool = False) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` (default ``stop_grace``).

        ``kill`` skips straight to SIGKILL.
        """
        with self._lock:
            self._release(self.stop_grace if timeout is None else timeout, kill)

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown."""
        self.stop(kill=True)

    def restart(self, kill: bool = False) -> Self:
        self.stop(kill=kill)
        return self.start()

    def close(self) -> None:
        """Stop, and remove the work dir if this object made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # Starting blocks for seconds; in a thread it does not freeze every
    # producer and consumer sharing the event loop.
    async def astart(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def astop(self, kill: bool = False) -> None:
        await asyncio.to_thread(self.stop, None, kill)

    async def arestart(self, kill: bool = False) -> Self:
        return await asyncio.to_thread(self.restart, kill)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"{type(self).__name__}({self.address}, {state}, work_dir={self.work_dir})"
