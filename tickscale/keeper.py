"""``python -m tickscale.keeper CMD...``: run ``tickscale up``'s scaler under the stack owner
its handlers follow.

The keeper is a child subreaper: the handlers the process backend starts as
orphans (``scaler.backends.detach``) become its children, and it gives the
scaler its own pid as the handlers' parent pid (``handler_parent_pid``). So:

- the scaler dies (SIGKILL, out of memory): the handlers keep consuming; the
  keeper starts the scaler again and the new one adopts them;
- the keeper gets SIGTERM, SIGINT or SIGHUP (``up`` stops, or ``up`` died and
  the kernel's parent-death signal fired): it passes SIGTERM on to the scaler,
  which drains and stops its handlers, and exits with the scaler's code;
- the keeper itself dies: the kernel sends the scaler SIGTERM, and each
  handler, no longer the keeper's child, drains and leaves on its own.

It reaps every child it inherits, so stopped handlers leave no zombies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path

from tickscale.localstack.proc import dying_with_parent

log = logging.getLogger("keeper")

_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
# A scaler that keeps crashing is not restarted forever: at most this many in a minute.
_MAX_RESTARTS_PER_MIN = 5
# Longer than a handler's stop grace (20 s): a handler told to stop drains in that.
_DRAIN_GRACE_S = 30.0


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class Keeper:
    def __init__(self, cmd: list[str]) -> None:
        self.cmd = dying_with_parent(cmd)
        self.env = os.environ | {"TICKSCALE_SCALER_HANDLER_PARENT_PID": str(os.getpid())}
        self.scaler: int | None = None
        self.stopping = False
        self.restarts: deque[float] = deque(maxlen=_MAX_RESTARTS_PER_MIN)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True
        self._stop_scaler()

    def _stop_scaler(self) -> None:
        if self.scaler is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.scaler, signal.SIGTERM)

    def _spawn(self) -> None:
        self.scaler = os.posix_spawnp(self.cmd[0], self.cmd, self.env)
        if self.stopping:  # a signal arrived while it was being started
            self._stop_scaler()

    def run(self) -> int:
        become_subreaper()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._spawn()
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid != self.scaler:
                continue  # an inherited handler that exited
            code = os.waitstatus_to_exitcode(status)
            if self.stopping or code >= 0:
                break
            now = time.monotonic()
            if len(self.restarts) == self.restarts.maxlen and now - self.restarts[0] < 60:
                log.error("scaler killed by signal %d again; not restarting it", -code)
                break
            self.restarts.append(now)
            log.warning("scaler killed by signal %d; starting it again to adopt its fleet", -code)
            time.sleep(1)
            if self.stopping:
                break
            self._spawn()
        if self.stopping:
            # A scaler stopped while it was still starting (a restart, say) dies of the
            # signal before it can stop its fleet: the keeper drains what is left, so
            # `up` has stopped every handler by the time it returns.
            self._drain_children()
        # Otherwise handlers still running follow this process and drain by themselves
        # once it has exited.
        return code if code >= 0 else 128 - code

    def _drain_children(self) -> None:
        """SIGTERM every child left (handlers inherited as a subreaper), reap them, and
        SIGKILL those still running after ``_DRAIN_GRACE_S``."""
        left = _children(os.getpid())
        if not left:
            return
        log.warning("stopping %d handler(s) the scaler left running: %s", len(left), left)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _DRAIN_GRACE_S
        while _children(os.getpid()):
            if time.monotonic() > deadline:
                for pid in _children(os.getpid()):
                    log.warning("handler pid %d did not stop; killing it", pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-1, os.WNOHANG)
            time.sleep(0.1)


def _children(parent: int) -> list[int]:
    """The live (not yet reaped) children of ``parent``, from /proc."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == parent and fields[0] not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if len(sys.argv) < 2:
        sys.exit("usage: python -m tickscale.keeper CMD...")
    sys.exit(Keeper(sys.argv[1:]).run())


if __name__ == "__main__":
    main()
