"""The process backend's record of its handlers, kept on disk so a restarted scaler adopts them.

One JSON file per fleet in the backend's state directory lists each handler's
pid, slot, name, metrics port and start time. A pid alone does not name a
process for long (the kernel hands it out again), so each entry also keeps the
process's start time in clock ticks since boot (``/proc/<pid>/stat``), and a
pid counts as the handler only while both match. Every change is a
read-modify-write under an exclusive ``flock``, since a leader and its standby
share the directory; the file itself is replaced atomically, so a reader
without the lock never sees half of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    pid: int
    slot: int
    name: str
    port: int
    started_at: float  # unix time, for "youngest first"
    start_ticks: int  # /proc/<pid>/stat field 22: tells a reused pid apart
    version: str = ""  # the HandlerVersion it runs (absent in older records)


@dataclass
class Record:
    next_serial: int = 1  # handler names are never reused, even across scalers
    handlers: list[Entry] = field(default_factory=list)


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return None
    return int(fields[19])


def alive(e: Entry) -> bool:
    """The process ``e`` recorded is still running (not a later process with its pid)."""
    return start_ticks(e.pid) == e.start_ticks


class FleetFile:
    """``state_dir/fleet-<name>.json``, with its lock file next to it."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self.path = state_dir / f"fleet-{name}.json"
        self._lock_path = state_dir / f"fleet-{name}.lock"

    def read(self) -> Record:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Record()
        return Record(raw["next_serial"], [Entry(**h) for h in raw["handlers"]])

    def write(self, rec: Record) -> None:
        data = {"next_serial": rec.next_serial, "handlers": [asdict(h) for h in rec.handlers]}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(data, indent=1))
            os.replace(tmp, self.path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)  # half written (a full disk): of no use
            raise

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Blocks while another process changes the record (call it from a worker thread)."""
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
