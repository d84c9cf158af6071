"""Port helpers shared by the local Kafka, Redis and Prometheus launchers."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """Return a TCP port that was free a moment ago.

    There is an unavoidable race between closing this probe socket and the
    child process binding the port; it is small on a test machine, and the
    launchers fail loudly (naming their log file) if they lose it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 30.0,
    alive: Callable[[], bool] | None = None,
    what: str = "service",
) -> None:
    """Block until ``host:port`` accepts TCP connections.

    ``alive`` lets the caller abort early when the child process has already
    died, instead of waiting out the whole timeout for a port that will never
    open.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if alive is not None and not alive():
            raise RuntimeError(f"{what} exited before {host}:{port} opened")
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not open {host}:{port} within {timeout:.0f}s")


def wait_for_port_closed(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_open(host, port, timeout=0.2):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{host}:{port} still accepting connections after {timeout:.0f}s")
