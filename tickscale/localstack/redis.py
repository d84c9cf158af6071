"""A throwaway redis-server on 127.0.0.1 that tests can take down and bring back."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from tickscale.localstack.net import HOST
from tickscale.localstack.service import LocalService


class RedisServer(LocalService):
    """redis-server with no persistence, on a fixed port for its whole life.

    ``stop()`` then ``start()`` comes back on the same port with an empty
    dataset, which is what an outage looks like to the handlers (they must
    re-publish, not assume state survived).
    """

    name = "redis"
    start_timeout = 15.0

    def __init__(
        self,
        port: int = 0,
        host: str = HOST,
        work_dir: Path | None = None,
        binary: str | None = None,
    ) -> None:
        super().__init__(port, host, work_dir)
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _prepare(self) -> None:
        if not Path(self.binary).exists():
            raise RuntimeError("redis-server not found: apt-get install redis-server")

    def _command(self) -> list[str]:
        return [
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

    def _ready(self) -> bool:
        # A PING, not just an open port: another process already listening on
        # the port would pass for this server while it fails to bind and exits.
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def __repr__(self) -> str:
        return f"RedisServer({self.url}, {'running' if self.running else 'stopped'})"
