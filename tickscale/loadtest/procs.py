"""The run's processes as the kernel sees them (``/proc``): which handlers live, in what state.

The load test counts and kills handlers by what exists, not by what the scaler believes: a
handler that outlives a killed scaler, or a scaler's list that outlives its handlers, would
otherwise be counted wrong.
"""

from __future__ import annotations

from pathlib import Path


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 on (the command name, field 2, may contain spaces)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2 :].split()


def process_state(pid: int) -> str | None:
    """R, S, T (stopped), Z ...; None when there is no such process."""
    try:
        return _stat(pid)[0]
    except (OSError, IndexError):
        return None


def handler_id(pid: int) -> str:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return ""
    for kv in env:
        if kv.startswith(b"TICKSCALE_HANDLER_HANDLER_ID="):
            return kv.split(b"=", 1)[1].decode()
    return ""


def handler_pids(fleet: str) -> list[int]:
    """The fleet's live handler processes, longest-running first.

    Found by their handler id (``handler-<fleet>-<n>``, which the process backend sets), not
    by parentage: a handler outliving a killed scaler is no longer its child.
    """
    prefix = f"handler-{fleet}-"
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            if b"handler" not in cmd or b"tickscale" not in cmd:
                continue
            if handler_id(pid).startswith(prefix):
                found.append((int(_stat(pid)[19]), pid))
        except (OSError, IndexError, ValueError):
            continue
    return [p for _, p in sorted(found)]
