"""`tickscale up`, the main job, end to end: its own broker and Redis, the scaler and its
handlers, a replayed window, the ledger."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.pipeline_utils import holding
from tickscale.localstack.net import free_port

# Each test runs the whole stack (broker, Redis, scaler, handlers) end to end.
pytestmark = pytest.mark.slow


def test_up_runs_a_replayed_open_with_the_scaler_and_verifies(tmp_path: Path) -> None:
    state = tmp_path / "up"
    r = subprocess.run(
        [sys.executable, "-m", "tickscale", "up", "--full-day", "--symbols", "10",
         "--from", "09:27",
         "--to", "09:34", "--speed", "30", "--handlers", "1", "--max-handlers", "2",
         "--kafka-port", str(free_port()), "--redis-port", str(free_port()),
         "--metrics-port", str(free_port()), "--scaler-port", str(free_port()),
         "--state-dir", "up"],
        # Relative, as the default .local/up is: every server gets the same path.
        cwd=tmp_path, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out = r.stdout + r.stderr
    scaler_log = (state / "logs" / "scaler.log").read_text(errors="replace")
    assert r.returncode == 0, out[-3000:] + scaler_log[-3000:]
    assert "missing=0 duplicated=0 reordered=0 checksum_mismatch=0" in out
    # The scaler ran the handlers, and the replayed open (the session floor, from the
    # replay clock) or its load took the fleet to the maximum.
    ups = [ln for ln in scaler_log.splitlines() if "scaler.audit: scale up" in ln]
    assert any("->2 " in ln for ln in ups), scaler_log[-3000:]
    assert list((state / "scaler" / "logs").glob("handler-*.log"))


def _until(pred: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what()
        time.sleep(0.3)


def _start_up(state: Path, out: Path, sigint_ignored: bool = False) -> subprocess.Popen[bytes]:
    # A script's `tickscale up &` starts with SIGINT ignored, as the shell does for
    # background commands; `exec` keeps that disposition.
    shell = ["sh", "-c", 'trap "" INT; exec "$@"', "sh"] if sigint_ignored else []
    with out.open("wb") as f:
        return subprocess.Popen(
            [*shell, sys.executable, "-m", "tickscale", "up", "--full-day", "--symbols", "5",
             "--from", "09:27",
             "--to", "10:30", "--speed", "1", "--handlers", "1", "--max-handlers", "1",
             "--partitions", "2",
             "--kafka-port", str(free_port()), "--redis-port", str(free_port()),
             "--metrics-port", str(free_port()), "--scaler-port", str(free_port()),
             "--state-dir", str(state)],
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip


def _until_consuming(state: Path, out: Path) -> None:
    logs = state / "scaler" / "logs"
    _until(
        lambda: any("assigned" in q.read_text() for q in logs.glob("handler-*.log")),
        120,
        out.read_text,
    )


def _kill_leftovers(state: Path) -> None:
    for pid in holding(state):  # never leave a broker behind for the next test
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("sig", "when"),
    [(signal.SIGTERM, "starting"), (signal.SIGHUP, "replaying"),
     (signal.SIGTERM, "starting in the background")],
    ids=["sigterm-starting", "sighup-replaying", "sigterm-background"],
)  # fmt: skip
def test_up_stops_the_whole_stack_on_sigterm_and_sighup(
    tmp_path: Path, sig: signal.Signals, when: str
) -> None:
    """A service manager's SIGTERM or a closed terminal's SIGHUP, during start-up or the
    replay, stops everything `up` started instead of leaving it running."""
    state = tmp_path / "up"
    out = tmp_path / "up.out"
    p = _start_up(state, out, sigint_ignored="background" in when)
    try:
        if when.startswith("starting"):
            # The broker is being started: its process exists, `up` waits for it.
            _until(lambda: (state / "kafka" / "server.log").exists(), 60, out.read_text)
        else:
            _until_consuming(state, out)
        assert p.poll() is None, out.read_text()
        p.send_signal(sig)
        assert p.wait(180) == 130, out.read_text()[-3000:]
        assert not holding(state), out.read_text()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
        _kill_leftovers(state)


def test_a_killed_up_takes_its_stack_with_it(tmp_path: Path) -> None:
    """SIGKILL (or the out-of-memory killer) gives `up` no chance to stop anything: the
    broker, Redis and the scaler it started must stop on their own, and the scaler's
    handlers with the scaler."""
    state = tmp_path / "up"
    out = tmp_path / "up.out"
    p = _start_up(state, out)
    try:
        _until_consuming(state, out)
        assert p.poll() is None, out.read_text()
        p.kill()
        p.wait(10)
        _until(lambda: not holding(state), 150, lambda: _still_running(state))
    finally:
        _kill_leftovers(state)


def _still_running(state: Path) -> str:
    """The command lines of what still holds a file under ``state``."""
    lines = []
    for pid in holding(state):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            lines.append(f"{pid}: {cmd[:200].decode(errors='replace')}")
    return "\n".join(lines)
