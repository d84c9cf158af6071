"""Checks shared by every process's settings, so each names a bad address the same way."""

from __future__ import annotations

import os
from pathlib import Path


def check_bootstrap(v: str) -> str:
    """``HOST:PORT[,HOST:PORT]`` or ValueError."""
    for hp in v.split(","):
        host, _, port = hp.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT[,HOST:PORT], got {v!r}")
    return v


def check_redis_url(v: str) -> str:
    """A redis://, rediss:// or unix:// URL or ValueError."""
    if not v.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"expected redis://host:port/db, got {v!r}")
    return v


def check_speed(v: str) -> str:
    """A replay speed: a finite number > 0 (a multiple of real time) or ``max``; else
    ValueError."""
    import math

    if v.lower() == "max":
        return "max"
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"expected a number or 'max', got {v!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"expected a finite number > 0 or 'max', got {v!r}")
    return v


def check_out_dir(v: Path | None) -> Path | None:
    """A directory a run can write into, made if missing (the run would make it anyway);
    ValueError saying why not. Checked by writing: a permission check alone passes for root
    where nothing can be made (``/proc``, a read-only mount)."""
    if v is None:
        return v
    if v.exists() and not v.is_dir():
        raise ValueError(f"{v} is a file, not a directory")
    try:
        v.mkdir(parents=True, exist_ok=True)
        probe = v / f".tickscale-write-check-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write into {v} ({e.strerror or e})") from None
    return v


def check_out_file(v: Path | None) -> Path | None:
    """A file a run writes when it ends (results, a chart): its folder made if missing and
    test-written now, so a path that cannot be written fails before the run, not after it;
    ValueError saying why not."""
    if v is None:
        return v
    if v.is_dir():
        raise ValueError(f"{v} is a directory; give a file path")
    check_out_dir(v.parent)
    return v
