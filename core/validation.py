"""Checks shared by every process's settings, so each names a bad address the same way."""

from __future__ import annotations


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
