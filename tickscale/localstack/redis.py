"""A throwaway redis-server on 127.0.0.1 that tests can take down and bring back."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tickscale.localstack import proc as _proc
from tickscale.localstack.net import HOST, free_port, wait_for_port, wait_for_port_closed


class RedisServer:
    """redis-server with no persistence, on a fixed port for its whole life.

    ``stop()`` then ``start()`` comes back on the same port with an empty
    dataset, which is what an outage looks like to the handlers (they must
    re-publish, not assume state survived).
    """

    def __init__(
        self,
        port: int = 0,
        host: str = HOST,
        work_dir: Path | None = None,
        binary: str | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="tickscale-redis-"))
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "redis.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> RedisServer:
        if self.running:
            return self
        if not Path(self.binary).exists():
            raise RuntimeError("redis-server not found: apt-get install redis-server")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            # Persistence off: a restart must lose data, like a fresh replica would,
            # and no RDB fork competes with a load test for the two cores.
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.work_dir),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--loglevel", "notice",
        ]  # fmt: skip
        self._proc = _proc.spawn(cmd, self.log_path)
        proc = self._proc
        try:
            wait_for_port(
                self.host, self.port, timeout, alive=lambda: proc.poll() is None, what="redis"
            )
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"{exc}; see {self.log_path}\n{_proc.tail(self.log_path)}") from exc
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        _proc.stop(self._proc, timeout=timeout)
        self._proc = None
        wait_for_port_closed(self.host, self.port)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the scratch dir if we created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisServer({self.url}, {'running' if self.running else 'stopped'})"
