"""``python -m scaler.backends.detach LOG CMD...``: start CMD as nobody's child; print its pid.

The process backend uses it when its handlers follow a stack owner (``tickscale
up``) rather than the scaler: the handler must be the owner's child, so the
scaler cannot be its parent. This launcher forks, prints the child's pid and
exits; the child, now an orphan, is re-parented to the nearest ancestor that
is a child subreaper (the owner), starts its own session (a Ctrl-C meant for
the stack must not reach it before the scaler drains it) and only then execs
CMD, so CMD never sees the launcher as its parent.
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m scaler.backends.detach LOG CMD...")
    log, cmd = argv[0], argv[1:]
    launcher = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            while os.getppid() == launcher:  # until the launcher below has exited
                time.sleep(0.001)
            out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)  # exec failed; nothing of the launcher's may run in the child
    print(pid, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
