"""Handlers as standalone containers on one Docker engine.

The backend owns exactly the containers labelled ``io.tickscale.role=handler``
and ``io.tickscale.scaler=<name>``: it lists, stops and removes those and
nothing else, so several fleets (and unrelated containers) can share an engine.
Nothing is kept in memory, so a restarted scaler adopts the handlers its
predecessor left running simply by listing them.

Containers get no restart policy: the scaler replaces dead handlers itself,
and an engine restarting them behind its back would make it overshoot.

The SDK is synchronous; every call runs in a worker thread so a slow engine
never stalls the scaler's event loop.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from docker.client import DockerClient, from_env
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import LogConfig
from requests import ConnectionError as RequestsConnectionError
from requests import RequestException
from requests import Timeout as RequestsTimeout

from core.constants import LABEL_ROLE, LABEL_SCALER, LEAVE_SIGNAL
from core.reach import keep_trying
from core.secrets import SECRETS_DIR
from scaler.backends.base import (
    BackendError,
    BackendHealth,
    BackendUnreachable,
    HandlerInstance,
    HandlerSpec,
    HandlerVersion,
)

log = logging.getLogger(__name__)

ROLE_HANDLER = "handler"
# Where a handler container serves /metrics and /healthz; recorded on the
# container so whoever scrapes it (and the port allocator below) can find it.
LABEL_METRICS_PORT = "io.tickscale.metrics-port"
CONTAINER_METRICS_PORT = 9100
# The HandlerVersion name a container runs (a rollout tells canary from fleet by it).
LABEL_VERSION = "io.tickscale.version"
# Swarm puts this on its task containers: those belong to a service, never to us.
_SWARM_TASK_LABEL = "com.docker.swarm.task.id"
_ENGINE_TIMEOUT_S = 30
ENGINE_ERRORS = (DockerException, RequestException, OSError)
_LOG_CONFIG = LogConfig(type="json-file", config={"max-size": "10m", "max-file": "3"})


@dataclass(frozen=True)
class ContainerShape:
    """How each handler container is made, beside its image.

    :param network: ``host`` runs handlers in the host's network namespace (each then needs
        its own metrics port, from ``host_port_base`` up); any other value is a network the
        containers join; None: the default bridge
    :param cpus: CPUs per handler (None: unlimited)
    :param mem_mb: memory per handler, MB (None: unlimited)
    :param host_port_base: first metrics port tried with ``network="host"``
    """

    network: str | None = None
    cpus: float | None = None
    mem_mb: int | None = None
    host_port_base: int = CONTAINER_METRICS_PORT


T = TypeVar("T")


def parse_docker_time(s: str | None) -> float:
    """Unix time of an engine timestamp (RFC 3339 with nanoseconds); 0.0 if unset."""
    if not s or s.startswith("0001-"):
        return 0.0
    s = s.replace("Z", "+00:00")
    # fromisoformat takes at most microseconds; the engine writes nanoseconds.
    if "." in s:
        head, _, rest = s.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        s = f"{head}.{rest[:digits][:6].ljust(6, '0')}{rest[digits:]}"
    try:
        return datetime.fromisoformat(s).timestamp()
    except ValueError:
        return 0.0


def engine_address(docker_host: str | None) -> str:
    return docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def connect(docker_host: str | None) -> Any:
    """A connected, pinged ``docker.DockerClient``; BackendError naming docker_host if not."""
    where = engine_address(docker_host)
    client = None
    try:
        if docker_host:
            client = DockerClient(base_url=docker_host, timeout=_ENGINE_TIMEOUT_S)
        else:
            client = from_env(timeout=_ENGINE_TIMEOUT_S)
        client.ping()
    except ENGINE_ERRORS as e:
        if client is not None:
            client.close()
        raise BackendError(f"docker_host: cannot reach Docker at {where}: {e}") from e
    return client


def _not_there_yet(e: BaseException) -> bool:
    """Whether a failed connect found nothing at the address (an engine down or restarting,
    a socket not made yet), rather than an address or an answer that cannot be used."""
    cause = e.__cause__
    # The client wraps the transport's error (refused, no such socket, timed out) in its own.
    if isinstance(cause, DockerException):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, RequestException):  # an OSError too, but most are answers
        return isinstance(cause, RequestsConnectionError | RequestsTimeout)
    return isinstance(cause, OSError)


async def reach_engine(docker_host: str | None, timeout_s: float) -> Any:
    """``connect``, retried with backoff while nothing answers at the address, up to
    ``timeout_s`` (an engine restarting, or started after the scaler); then
    BackendUnreachable naming docker_host. Anything else is raised at once."""
    where = engine_address(docker_host)

    def absent(e: Exception) -> str | None:
        if isinstance(e, BackendError) and _not_there_yet(e):
            return f"no Docker engine at {where} yet"
        return None

    def given_up(e: Exception) -> Exception:
        return BackendUnreachable(
            f"docker_host: no Docker engine answered at {where} within {timeout_s:g} s "
            "(is it running, is the address right?)"
        )

    return await keep_trying(
        timeout_s, lambda: asyncio.to_thread(connect, docker_host), absent, given_up
    )


def check_image(client: Any, image: str, where: str) -> None:
    """The image must already be on the engine: backends never pull."""
    try:
        client.images.get(image)
    except ImageNotFound as e:
        raise BackendError(
            f"image: {image} not found on the Docker engine at {where} "
            "(images are never pulled; build or load it there first)"
        ) from e
    except APIError as e:
        # A socket proxy that only exposes the container endpoints refuses
        # image lookups; creating a container will still fail loudly if missing.
        if e.status_code == 403:
            log.warning("image: cannot check %s here (engine API refused: %s)", image, e)
            return
        raise BackendError(f"image: cannot check {image} on {where}: {e}") from e


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the handler's server binds: TIME_WAIT leftovers don't block it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


class EngineClient:
    """What the container and the Swarm backend share: one engine connection,
    calls in worker threads with engine errors as BackendError, this fleet's labels."""

    kind = "Docker"
    fleet: str
    where: str
    _client: Any

    async def health(self) -> BackendHealth:
        try:
            return await asyncio.to_thread(self._health)
        except (*ENGINE_ERRORS, BackendError) as e:
            return BackendHealth(False, f"{self.kind} at {self.where}: {e}")

    def _health(self) -> BackendHealth:
        raise NotImplementedError

    @property
    def client(self) -> Any:
        if self._client is None:
            raise BackendError(f"{self.kind.lower()} backend not started")
        return self._client

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except ENGINE_ERRORS as e:
            raise BackendError(f"{what} on {self.where}: {e}") from e

    def _labels(self) -> dict[str, str]:
        return {LABEL_ROLE: ROLE_HANDLER, LABEL_SCALER: self.fleet}


class DockerBackend(EngineClient):
    name = "docker"
    stops_chosen = True

    def __init__(
        self, spec: HandlerSpec, *, image: str, name: str = "default",
        shape: ContainerShape | None = None, stop_grace_s: float = 30.0,
        docker_host: str | None = None, connect_timeout_s: float = 120.0,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.image = image
        self.version = HandlerVersion(image, image=image)
        self.fleet = name
        self.shape = shape or ContainerShape()
        self.network = self.shape.network
        self.stop_grace_s = stop_grace_s
        self.docker_host = docker_host
        self.connect_timeout_s = connect_timeout_s
        self.where = engine_address(docker_host)
        self._client: Any = None
        # Port allocation reads the engine, then creates: one add() at a time.
        self._add_lock = asyncio.Lock()

    # Lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._client = await reach_engine(self.docker_host, self.connect_timeout_s)
        try:
            await asyncio.to_thread(check_image, self._client, self.image, self.where)
            await asyncio.to_thread(self._check_network)
        except BaseException:
            await self.close()
            raise
        live = await self.list()
        log.info(
            "docker backend %r on %s: %d handler container(s) already running",
            self.fleet, self.where, len(live),
        )  # fmt: skip

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.close)

    async def retire(self) -> None:
        """Nothing to drop: ``remove`` already stopped and removed the containers."""

    # Backend --------------------------------------------------------------------------

    async def list(self) -> builtins.list[HandlerInstance]:
        return await self._call("list handler containers", self._list_and_reap)

    def set_version(self, version: HandlerVersion) -> None:
        self.version = version

    async def add(self, n: int, version: HandlerVersion | None = None) -> builtins.list[str]:
        if n <= 0:
            return []
        version = version or self.version
        if not version.image:
            raise BackendError(f"image: version {version.name} names no image")
        if version.image != self.version.image:
            await self._call("check the image", check_image, self.client, version.image, self.where)
        async with self._add_lock:
            return await self._call("start handler containers", self._add, n, version)

    async def remove(self, n: int) -> builtins.list[str]:
        if n <= 0:
            return []
        live = await self.list()  # oldest first
        return await self._stop_all(live[::-1][:n])

    async def remove_ids(self, ids: builtins.list[str]) -> builtins.list[str]:
        wanted = set(ids)
        return await self._stop_all([h for h in await self.list() if h.id in wanted])

    async def announce_replacement(self, ids: builtins.list[str]) -> builtins.list[str]:
        return await self._call("announce a replacement", self._signal, ids, LEAVE_SIGNAL)

    def _signal(self, ids: builtins.list[str], sig: str) -> builtins.list[str]:
        told = []
        for cid in ids:
            with contextlib.suppress(NotFound):
                self.client.containers.get(cid).kill(signal=sig)
                told.append(cid)
        return told

    async def _stop_all(self, victims: builtins.list[HandlerInstance]) -> builtins.list[str]:
        if not victims:
            return []
        # Concurrently: n handlers draining one after the other would take n
        # grace periods, and each departure would cost its own rebalance. Own
        # threads, since the loop's default pool may be smaller than n.
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=len(victims) or 1) as pool:
            results = await asyncio.gather(
                *(loop.run_in_executor(pool, self._stop_and_remove, h.id, h.name) for h in victims),
                return_exceptions=True,
            )
        failed = [
            f"{h.name}: {r}"
            for h, r in zip(victims, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if failed:
            raise BackendError("stop handler containers: " + "; ".join(failed))
        return [h.id for h in victims]

    # Engine side (worker threads) ------------------------------------------------------

    def _mine(self) -> builtins.list[Any]:
        """Every container labelled for this scaler, in any state."""
        filters = {"label": [f"{k}={v}" for k, v in self._labels().items()]}
        found = self.client.containers.list(all=True, filters=filters, ignore_removed=True)
        return [c for c in found if _SWARM_TASK_LABEL not in (c.labels or {})]

    def _check_network(self) -> None:
        if self.network is None or self.network == "host":
            return
        try:
            self.client.networks.get(self.network)
        except NotFound as e:
            raise BackendError(f"network: no network {self.network!r} on {self.where}") from e
        except APIError as e:
            if e.status_code == 403:
                log.warning("network: cannot check %s here (API refused: %s)", self.network, e)
                return
            raise BackendError(f"network: cannot check {self.network!r}: {e}") from e

    def _list_and_reap(self) -> builtins.list[HandlerInstance]:
        live: builtins.list[tuple[float, HandlerInstance]] = []
        for c in self._mine():
            state = c.attrs.get("State") or {}
            status = state.get("Status", c.status)
            if status in ("exited", "dead"):
                _reap(c, state)
                continue
            if status == "running":
                health = (state.get("Health") or {}).get("Status")
                # Up but not yet through its first health check: not serving yet.
                shown = "starting" if health == "starting" else "running"
            elif status in ("created", "restarting"):
                shown = "starting"
            else:  # paused, removing: alive in some sense, but not consuming
                continue
            created = parse_docker_time(c.attrs.get("Created"))
            started = parse_docker_time(state.get("StartedAt")) or created
            version = (c.labels or {}).get(LABEL_VERSION, "")
            live.append((created, HandlerInstance(c.id, c.name, shown, started, version)))
        live.sort(key=lambda t: t[0])
        return [h for _, h in live]

    def _add(self, n: int, version: HandlerVersion) -> builtins.list[str]:
        host = self.network == "host"
        base = self.shape.host_port_base
        ports = (
            _host_ports(self.client, self.where, base, n) if host else [CONTAINER_METRICS_PORT] * n
        )
        created: builtins.list[tuple[Any, str]] = []
        # Created one after the other, so creation order (the age the scaler sees)
        # is the order of the returned ids.
        try:
            for port in ports:
                created.append(self._create(port, version))
        except BaseException:
            self._discard([c for c, _ in created])
            raise
        # Started together: handlers that reach the group within one join window
        # share one rebalance, where one after the other each could cause its own.
        with ThreadPoolExecutor(max_workers=len(created)) as pool:
            errors = list(pool.map(self._start, created))
        failed = [(c, e) for (c, _), e in zip(created, errors, strict=True) if e is not None]
        if failed:
            # A created-but-never-started container would look "starting" forever.
            self._discard([c for c, _ in failed])
            raise failed[0][1]
        return [c.id for c, _ in created]

    def _create(self, port: int, version: HandlerVersion) -> tuple[Any, str]:
        name = f"tickscale-handler-{self.fleet}-{secrets.token_hex(4)}"
        labels = self._labels() | {LABEL_METRICS_PORT: str(port), LABEL_VERSION: version.name}
        kwargs = _create_args(self.spec, self.shape, name, port, version) | {"labels": labels}
        # create + start rather than run(): run() pulls a missing image.
        try:
            return self.client.containers.create(**kwargs), name
        except ImageNotFound as e:
            raise BackendError(f"image: {version.image} not found on {self.where}") from e

    @staticmethod
    def _start(created: tuple[Any, str]) -> BaseException | None:
        c, name = created
        try:
            c.start()
        except ENGINE_ERRORS as e:
            return e
        log.info("started handler container %s (%s)", name, c.short_id)
        return None

    @staticmethod
    def _discard(containers: builtins.list[Any]) -> None:
        for c in containers:
            with contextlib.suppress(*ENGINE_ERRORS):
                c.remove(force=True)

    def _stop_and_remove(self, cid: str, name: str) -> None:
        t0 = time.monotonic()
        try:
            c = self.client.containers.get(cid)
            # SIGTERM, then SIGKILL after the grace period: the handler commits
            # its batch in flight and leaves the group in between.
            c.stop(timeout=max(1, math.ceil(self.stop_grace_s)))
            c.reload()
        except NotFound:
            log.info("handler container %s already gone", name)
            return
        code = (c.attrs.get("State") or {}).get("ExitCode")
        took = time.monotonic() - t0
        if took >= self.stop_grace_s:
            log.warning("handler container %s killed after %.0fs grace (exit %s)", name, took, code)
        else:
            log.info("stopped handler container %s (exit %s) in %.1fs", name, code, took)
        with contextlib.suppress(NotFound):
            c.remove(force=True)

    def _health(self) -> BackendHealth:
        self.client.ping()
        counts = {"running": 0, "starting": 0, "dead": 0}
        for c in self._mine():
            status = c.status
            if status == "running":
                counts["running"] += 1
            elif status in ("created", "restarting"):
                counts["starting"] += 1
            elif status in ("exited", "dead"):
                counts["dead"] += 1
        detail = ", ".join(f"{v} {k}" for k, v in counts.items())
        return BackendHealth(
            True,
            f"Docker at {self.where}: {detail}",
            {k: str(v) for k, v in counts.items()} | {"engine": self.where},
        )


def _reap(c: Any, state: dict[str, Any]) -> None:
    """Remove a dead handler container, saying why it died."""
    why = f"exit code {state.get('ExitCode')}"
    if state.get("OOMKilled"):
        why += ", killed for memory"
    if state.get("Error"):
        why += f", {state['Error']}"
    log.warning("handler container %s died (%s); removing it", c.name, why)
    with contextlib.suppress(NotFound):
        c.remove(force=True)


def _host_ports(client: Any, where: str, base: int, n: int) -> list[int]:
    """n metrics ports no other handler on this host uses (host networking only)."""
    taken: set[int] = set()
    every_handler = {"label": [f"{LABEL_ROLE}={ROLE_HANDLER}"]}
    # Any fleet's handlers: they all share the host's ports.
    for c in client.containers.list(all=True, filters=every_handler, ignore_removed=True):
        port = (c.labels or {}).get(LABEL_METRICS_PORT, "")
        if port.isdigit() and c.status not in ("exited", "dead"):
            taken.add(int(port))
    # Something else may listen there too; only checkable when the engine
    # runs on this machine.
    local = where.startswith(("unix://", "tcp://127.0.0.1:", "tcp://localhost:"))
    ports: list[int] = []
    port = base
    while len(ports) < n:
        if port > 65535:
            raise BackendError(f"no free metrics port from {base} up")
        if port not in taken and (not local or _port_free(port)):
            ports.append(port)
        port += 1
    return ports


def _create_args(
    spec: HandlerSpec, shape: ContainerShape, name: str, port: int, version: HandlerVersion
) -> dict[str, Any]:
    """The engine's create arguments for one handler container (its labels aside)."""
    env = spec.env() | {
        "TICKSCALE_HANDLER_HANDLER_ID": name,
        "TICKSCALE_HANDLER_VERSION": version.name,
        "TICKSCALE_HANDLER_METRICS_PORT": str(port),
        # The image's HEALTHCHECK probes this one.
        "TICKSCALE_METRICS_PORT": str(port),
    }
    kwargs: dict[str, Any] = {
        "image": version.image,
        "command": ["handler"],
        "name": name,
        "environment": env,
        "restart_policy": {"Name": "no"},
        "read_only": True,
        "tmpfs": {"/tmp": ""},
        "security_opt": ["no-new-privileges:true"],
        "log_config": _LOG_CONFIG,
    }
    if spec.secrets:
        # Each password one read-only file, the only mounts the gate lets through.
        kwargs["volumes"] = {
            src: {"bind": f"{SECRETS_DIR}/{file}", "mode": "ro"}
            for file, src in spec.secrets.items()
        }
    if shape.network == "host":
        kwargs["network_mode"] = "host"
    elif shape.network:
        kwargs["network"] = shape.network
    if shape.cpus:
        kwargs["nano_cpus"] = int(shape.cpus * 1e9)
    if shape.mem_mb:
        kwargs["mem_limit"] = f"{shape.mem_mb}m"
    return kwargs
