"""The gate's HTTP side: one thread per connection, each allowed request
forwarded to the engine's unix socket and its whole answer sent back.

The stdlib suffices: the allowed calls are short request/response exchanges
(no attach, logs or events streams), so nothing needs to be streamed.
"""

from __future__ import annotations

import http.client
import logging
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from tickscale.gate.policy import Allow, Owned, Policy, Refuse
from tickscale.gate.settings import GateSettings

log = logging.getLogger(__name__)

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
               "proxy-connection", "te", "trailer", "upgrade"}  # fmt: skip


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("docker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Engine:
    """Plain requests to the engine's socket, one connection each."""

    def __init__(self, socket_path: str, timeout_s: float) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    def call(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = _UnixConnection(self.socket_path, self.timeout_s)
        try:
            conn.request(method, path, body=body or None, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def labels(self, kind: str, ref: str) -> tuple[int, dict[str, str], str]:
        """The engine's status for the object, its labels and its id (when found)."""
        ref = quote(ref)
        path = f"/containers/{ref}/json" if kind == "container" else f"/services/{ref}"
        status, _, body = self.call("GET", path)
        if status != 200:
            return status, {}, ""
        doc = orjson.loads(body)
        labels = (doc.get("Config") or {}) if kind == "container" else (doc.get("Spec") or {})
        return status, labels.get("Labels") or {}, str(doc.get("Id") or doc.get("ID") or "")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: GateServer

    def do_GET(self) -> None:
        self._gate()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _gate(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._answer(411, {"message": "tickscale gate: send a Content-Length"})
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = urlsplit(self.path)
        self.server.learn_network()
        decision = self.server.policy.decide(self.command, parts.path, body, parts.query)
        target = self.path
        if isinstance(decision, Owned):
            owned = decision
            try:
                status, labels, oid = self.server.engine.labels(owned.kind, owned.ref)
            except OSError as e:
                self._answer(502, {"message": f"tickscale gate: engine unreachable: {e}"})
                return
            if status != 200 or not oid:
                code = status if status != 200 else 404
                self._answer(code, {"message": f"no such {owned.kind}: {owned.ref}"})
                return
            if not self.server.policy.labels_ok(labels):
                decision = Refuse(f"{owned.kind} {owned.ref} is not this fleet's handler")
            else:
                decision = Allow()
                # Forwarded by the id just checked, not by a name that another
                # container could take in between.
                seg = f"/{owned.kind}s/{owned.ref}"
                target = self.path.replace(seg, f"/{owned.kind}s/{oid}", 1)
        if isinstance(decision, Refuse):
            log.warning("refused %s %s: %s", self.command, self.path, decision.reason)
            self._answer(403, {"message": f"tickscale gate: {decision.reason}"})
            return
        self._forward(target, body)

    def _forward(self, target: str, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        try:
            status, resp_headers, data = self.server.engine.call(
                self.command, target, body, headers
            )
        except OSError as e:
            log.error("engine unreachable at %s: %s", self.server.engine.socket_path, e)
            self._answer(502, {"message": f"tickscale gate: engine unreachable: {e}"})
            return
        self.send_response(status)
        for k, v in resp_headers:
            if k.lower() not in _HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _answer(self, status: int, doc: dict[str, Any]) -> None:
        data = orjson.dumps(doc)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


class GateServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, settings: GateSettings) -> None:
        self.policy = Policy(settings)
        self.engine = Engine(settings.engine_socket, settings.engine_timeout_s)
        self.network = settings.network if settings.mode == "swarm" else None
        super().__init__((settings.host, settings.port), _Handler)

    def learn_network(self) -> None:
        """The configured network's id, read once (the engine may be late to answer)."""
        if not self.network or self.policy.network_ids:
            return
        try:
            status, _, body = self.engine.call("GET", f"/networks/{quote(self.network)}")
        except OSError:
            return
        if status == 200:
            self.policy.network_ids.add(orjson.loads(body)["Id"])
