"""The lifecycle the local Kafka, Redis and Prometheus launchers share (LocalService)."""

from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import redis

from tickscale.localstack import RedisServer
from tickscale.localstack.net import port_open
from tickscale.localstack.service import LocalService

# Listens on the given port and ignores SIGTERM: a server that hangs in its shutdown.
_STUBBORN = """
import signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("listening", flush=True)
time.sleep(600)
"""


class _Stubborn(LocalService):
    name = "stubborn"
    start_timeout = 20.0
    stop_grace = 0.5

    def _command(self) -> list[str]:
        return [sys.executable, "-c", _STUBBORN, str(self.port)]

    def _ready(self) -> bool:
        return port_open(self.host, self.port)


class _Exits(_Stubborn):
    def _command(self) -> list[str]:
        return [sys.executable, "-c", "print('cannot start: bad config'); raise SystemExit(3)"]


def test_stop_escalates_to_sigkill_after_the_grace(tmp_path: Path) -> None:
    svc = _Stubborn(work_dir=tmp_path / "svc")
    with svc:
        proc = svc._proc
        assert proc is not None and svc.pid == proc.pid
        assert (tmp_path / "svc" / "stubborn.log").read_text().startswith("listening")
        t0 = time.monotonic()
        svc.stop()
        took = time.monotonic() - t0
    assert proc.returncode == -signal.SIGKILL  # SIGTERM was ignored
    assert 0.5 <= took < 10, took
    assert not svc.running and svc.pid is None
    assert not port_open(svc.host, svc.port)
    assert (tmp_path / "svc").is_dir()  # a work dir passed in is kept


def test_a_process_that_exits_during_startup_is_named_with_its_log(tmp_path: Path) -> None:
    svc = _Exits(work_dir=tmp_path / "svc")
    with pytest.raises(RuntimeError) as excinfo:
        svc.start()
    message = str(excinfo.value)
    assert "exited with code 3" in message
    assert str(svc.log_path) in message and "cannot start: bad config" in message
    assert not svc.running


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    class _Deaf(_Stubborn):
        def _ready(self) -> bool:
            return False

    svc = _Deaf(work_dir=tmp_path / "svc")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as excinfo:
        svc.start(timeout=1.0)
    assert time.monotonic() - t0 < 10
    assert str(svc.log_path) in str(excinfo.value)
    assert not svc.running  # the half-started process is not left behind


async def test_async_with_starts_and_closes_redis() -> None:
    async with RedisServer() as server:
        work_dir = server.work_dir
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
        finally:
            client.close()
    assert not server.running
    assert not work_dir.exists()  # its own temporary dir is removed
    assert not port_open(server.host, server.port)


def test_redis_on_a_taken_port_fails_naming_its_log(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        server = RedisServer(port=blocker.getsockname()[1], work_dir=tmp_path / "redis")
        # redis-server cannot bind, so it exits; an open port must not pass for ready.
        with pytest.raises((RuntimeError, TimeoutError)) as excinfo:
            server.start()
    assert str(server.log_path) in str(excinfo.value)
    assert not server.running
