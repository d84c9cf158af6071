"""Helpers for end-to-end tests: handler processes, replays, verification, metrics."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tickscale.localstack.net import free_port
from tickscale.localstack.topics import TopicSet


class HandlerProc:
    """A real ``tickscale handler`` process (so SIGKILL is a real SIGKILL)."""

    def __init__(
        self,
        ts: TopicSet,
        log_dir: Path,
        name: str,
        redis_url: str | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = log_dir / f"handler-{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "tickscale",
            "handler",
            "--bootstrap",
            ts.bootstrap,
            "--in",
            ts.raw,
            "--out",
            ts.ticks,
            "--deadletter",
            ts.deadletter,
            "--group",
            ts.group,
            "--metrics-port",
            str(self.port),
            "--id",
            name,
        ]
        if redis_url:
            cmd += ["--redis", redis_url]
        cmd += extra or []
        self._log = self.log_path.open("wb")
        env = dict(os.environ, TICKSCALE_HANDLER_SESSION_TIMEOUT_MS="6000")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a metric's samples whose label set contains ``labels``."""
        total = 0.0
        found = False
        for line in self.metrics().splitlines():
            m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
            if m and labels in (m.group(1) or ""):
                total += float(m.group(2))
                found = True
        if not found:
            return 0.0
        return total

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"handler {self.name} exited: {self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"handler {self.name} not ready: {self.log()}")

    def terminate(self, timeout: float = 60, sig: signal.Signals = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._log.closed:
            self._log.close()


def replay_cmd(ts: TopicSet, manifest: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tickscale",
        "replay",
        "--bootstrap",
        ts.bootstrap,
        "--topic",
        ts.raw,
        "--manifest",
        str(manifest),
        "--no-progress",
        *args,
    ]


def run_replay(ts: TopicSet, manifest: Path, *args: str, timeout: float = 300) -> str:
    r = subprocess.run(
        replay_cmd(ts, manifest, *args), capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def start_replay(ts: TopicSet, manifest: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        replay_cmd(ts, manifest, *args), stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def run_verify(ts: TopicSet, manifest: Path, timeout_s: float = 90) -> tuple[int, str]:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tickscale",
            "verify",
            "--bootstrap",
            ts.bootstrap,
            "--topic",
            ts.ticks,
            "--manifest",
            str(manifest),
            "--deadletter-topic",
            ts.deadletter,
            "--timeout",
            str(timeout_s),
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s + 120,
    )
    return r.returncode, r.stdout + r.stderr


def summary(out: str) -> dict[str, int]:
    last = [ln for ln in out.splitlines() if ln.startswith("missing=")][-1]
    return {k: int(v) for k, v in (kv.split("=") for kv in last.split())}


def readyz(port: int) -> int:
    """The HTTP status of a process's /readyz on ``port``; 0 while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening yet
        return 0


def deadletters(out: str) -> tuple[int, int]:
    """(dead letters found, expected) from verify's ``deadletters=N expected=M`` line."""
    last = [ln for ln in out.splitlines() if ln.startswith("deadletters=")][-1]
    found, expected = (int(kv.split("=")[1]) for kv in last.split())
    return found, expected


def json_trades(symbol: str, n: int) -> list[dict[str, object]]:
    """``n`` valid trades of one symbol in the JSONL replay format, 1 ns apart."""
    return [
        {
            "type": "trade",
            "symbol": symbol,
            "venue": "XCOI",
            "ts": 1732545000000000000 + i,
            "price": f"97000.{i:02d}",
            "size": "0.01",
            "side": "B",
            "trade_id": str(i),
        }
        for i in range(n)
    ]


def holding(path: Path) -> list[int]:
    """Processes with a file under ``path`` open (logs, data): what a stack left running."""
    root = str(path)
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fds = list((d / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith(root):
                    pids.append(int(d.name))
                    break
    return pids
