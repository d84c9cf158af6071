"""Child-process plumbing shared by the local Kafka, Redis and Prometheus launchers."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

# Servers started by this interpreter. If pytest crashes or a developer hits
# Ctrl-C twice, fixture teardown never runs; without this a JVM would keep the
# port (and 768 MB) until someone finds it by hand.
_LIVE: set[subprocess.Popen[bytes]] = set()


def dying_with_parent(cmd: Sequence[str]) -> list[str]:
    """``cmd`` set to receive SIGTERM when this process dies, however it dies.

    ``atexit`` covers a normal exit and Ctrl-C; a SIGKILL or the out-of-memory
    killer skips it and would leave a broker, Redis or a scaler running with
    nobody to stop it. The kernel's parent-death signal (``setpriv``, part of
    util-linux) fires on the death of the *thread* that started the child, so
    it is set only from the main thread, which lives as long as the process.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return list(cmd)
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd]


def spawn(
    cmd: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group with stdout+stderr appended to ``log_path``.

    A separate session keeps a terminal's Ctrl-C from reaching the child
    directly, so the parent decides the shutdown order, and lets ``stop`` signal
    any grandchildren along with it. The child is stopped if this process is
    killed (``dying_with_parent``).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            dying_with_parent(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    _LIVE.add(proc)
    return proc


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0, kill: bool = False) -> int:
    """SIGTERM (or SIGKILL when ``kill``) the process group, escalating after ``timeout``.

    Returns the exit code. Safe to call on an already-exited process.
    """
    try:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        else:
            # The leader is gone but a grandchild may still hold the group.
            _signal_group(proc, signal.SIGKILL)
    finally:
        _LIVE.discard(proc)
    return proc.returncode


def errors(path: Path, limit: int = 8) -> str:
    """The first ERROR/FATAL lines (plus the line after, usually the cause) of a log.

    A JVM that dies logs its root cause early and then hundreds of shutdown
    lines, so the tail alone rarely says why.
    """
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    picked: list[str] = []
    for i, line in enumerate(lines):
        if " ERROR " in line or " FATAL " in line:
            picked.extend(lines[i : i + 2])
            if len(picked) >= 2 * limit:
                break
    return "\n".join(picked)


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


@atexit.register
def _reap_all() -> None:
    for proc in list(_LIVE):
        stop(proc, timeout=5, kill=False)
