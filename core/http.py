"""A minimal asyncio HTTP endpoint: /metrics, /healthz, /readyz.

prometheus_client's own exporter answers every path with metrics, and the
services need health and readiness probes beside them, so this serves all
three from the event loop with no extra dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest


class PortInUse(OSError):
    """The port asked for is taken (another process listens on it)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(errno.EADDRINUSE, f"{host}:{port} is already in use")
        self.host = host
        self.port = port


class CannotListen(OSError):
    """The address cannot be listened on: not one of this machine's, a name that does not
    resolve, a port this user may not bind."""

    def __init__(self, host: str, port: int, why: str, code: int | None) -> None:
        super().__init__(code, f"cannot listen on {host}:{port} ({why})")
        self.host = host
        self.port = port


class HealthServer:
    """Serves metrics and probes; ``port=0`` picks a free port (see ``.port``)."""

    def __init__(
        self,
        host: str,
        port: int,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.host = host
        self.port = port
        self._healthy = healthy
        self._ready = ready
        self._registry = registry
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; raises :class:`PortInUse` when the port is taken, :class:`CannotListen`
        when the address cannot be had at all."""
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(self.host, self.port) from None
            # asyncio words a failed bind at length; the system's own text is enough.
            why = os.strerror(e.errno) if e.errno and e.errno > 0 else (e.strerror or str(e))
            raise CannotListen(self.host, self.port, why, e.errno) from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) > 1 else "/"
            if path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
            elif path == "/healthz":
                ok = self._healthy()
                status, ctype, body = (
                    (200 if ok else 503),
                    "text/plain",
                    b"ok\n" if ok else b"unhealthy\n",
                )
            elif path == "/readyz":
                ok = self._ready()
                status, ctype, body = (
                    (200 if ok else 503),
                    "text/plain",
                    b"ready\n" if ok else b"not ready\n",
                )
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
