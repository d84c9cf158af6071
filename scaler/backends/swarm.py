"""Handlers as the replicas of one Docker Swarm service.

The scaler only changes the service's replica count; Swarm places the tasks,
replaces crashed ones, and on scale-in picks the tasks to stop and sends them
SIGTERM with the service's stop grace period. The service is created (with
zero replicas) on first start and carries the scaler's labels; an existing
service of that name without them is refused rather than taken over. A scaler
that stops its handlers on exit scales the service to zero, waits for the
tasks to drain and removes the service, which would otherwise keep its
network in use.

A swarm spans machines, so the network must be an overlay (or ``host``).
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from typing import Any, TypeVar

from docker.errors import APIError, NotFound
from docker.types import Healthcheck, Resources, RestartPolicy, SecretReference, ServiceMode

from core.constants import LABEL_SCALER
from core.retry import retry_sync
from scaler.backends.base import (
    BackendError,
    BackendHealth,
    HandlerInstance,
    HandlerSpec,
    HandlerVersion,
)
from scaler.backends.docker import (
    CONTAINER_METRICS_PORT,
    LABEL_METRICS_PORT,
    ContainerShape,
    EngineClient,
    check_image,
    connect,
    engine_address,
    parse_docker_time,
)

log = logging.getLogger(__name__)

# Task states before "running": the task exists and is on its way up.
_STARTING = {"new", "pending", "assigned", "accepted", "ready", "preparing", "starting"}
_SCALE_RETRIES = 5
# Beyond the stop grace period: Swarm's own lag between a task's exit and its state.
_RETIRE_MARGIN_S = 15.0
# The image's user (Dockerfile), owner of the secret files in a task.
_UID = "10001"

T = TypeVar("T")
# One service runs one image, and Swarm picks which task to stop: a canary beside
# the fleet needs handlers the scaler can address one by one.
_NO_ROLLOUT = (
    "rollout: the swarm backend runs every handler as one service of one image; "
    "roll out with the docker or process backend"
)


def _out_of_sequence(e: BaseException) -> bool:
    """Someone else updated the service since we read it: read it again and retry."""
    return isinstance(e, APIError) and "out of sequence" in str(e)


class _OneImage:
    """A service runs one image: the Backend's version calls, refusing any other."""

    image: str

    def set_version(self, version: HandlerVersion) -> None:
        if version.image != self.image:
            raise BackendError(_NO_ROLLOUT)

    async def remove_ids(self, ids: builtins.list[str]) -> builtins.list[str]:
        raise BackendError(_NO_ROLLOUT)

    async def announce_replacement(self, ids: builtins.list[str]) -> builtins.list[str]:
        return []  # tasks are not addressed one by one here


class SwarmBackend(EngineClient, _OneImage):
    name = "swarm"
    kind = "Swarm"

    def __init__(
        self,
        spec: HandlerSpec,
        *,
        image: str,
        service: str = "tickscale-handlers",
        name: str = "default",
        shape: ContainerShape | None = None,
        stop_grace_s: float = 30.0,
        docker_host: str | None = None,
    ) -> None:
        """:param shape: the tasks' network and limits (its host_port_base is unused: a
        service's tasks share one metrics port in their own namespaces)"""
        self.spec = spec
        self.image = image
        self.service = service
        self.fleet = name
        self.shape = shape or ContainerShape()
        self.network = self.shape.network
        self.stop_grace_s = stop_grace_s
        self.docker_host = docker_host
        self.version = HandlerVersion(image, image=image)
        self.where = engine_address(docker_host)
        self._client: Any = None
        # Replica changes are read-modify-write on the service spec.
        self._lock = asyncio.Lock()

    # Lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._client = await asyncio.to_thread(connect, self.docker_host)
        try:
            await self._call("check the swarm", self._check_manager)
            await asyncio.to_thread(check_image, self._client, self.image, self.where)
            await self._call("check the network", self._check_network)
            await self._call("create the service", self._ensure_service)
        except BaseException:
            await self.close()
            raise

    async def retire(self) -> None:
        """Wait for the scaled-in tasks to drain, then remove the service: it holds the
        overlay network, and removing it while tasks still run would kill them."""
        deadline = time.monotonic() + self.stop_grace_s + _RETIRE_MARGIN_S
        while await self._call("list service tasks", self._running_tasks):
            if time.monotonic() > deadline:
                raise BackendError(
                    f"swarm_service: tasks of {self.service!r} still running after "
                    f"{self.stop_grace_s + _RETIRE_MARGIN_S:.0f} s; service left in place"
                )
            await asyncio.sleep(0.5)
        await self._call("remove the service", self._remove_service)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.close)

    # Backend --------------------------------------------------------------------------

    async def list(self) -> builtins.list[HandlerInstance]:
        return await self._call("list service tasks", self._tasks)

    async def add(self, n: int, version: HandlerVersion | None = None) -> builtins.list[str]:
        if version is not None and version.image != self.image:
            raise BackendError(_NO_ROLLOUT)
        if n <= 0:
            return []
        async with self._lock:
            old, new = await self._call("scale the service", self._scale_by, n)
        return [f"{self.service}/replica-{k}" for k in range(old + 1, new + 1)]

    async def remove(self, n: int) -> builtins.list[str]:
        if n <= 0:
            return []
        async with self._lock:
            old, new = await self._call("scale the service", self._scale_by, -n)
        return [f"{self.service}/replica-{k}" for k in range(old, new, -1)]

    # Engine side (worker threads) ------------------------------------------------------

    def _check_manager(self) -> None:
        swarm = self.client.info().get("Swarm") or {}
        state = swarm.get("LocalNodeState", "?")
        if state != "active" or not swarm.get("ControlAvailable"):
            raise BackendError(
                f"docker_host: the engine at {self.where} is not a swarm manager "
                f"(swarm state {state!r}); point docker_host at a manager or use the docker backend"
            )

    def _check_network(self) -> None:
        _check_overlay(self.client, self.network, self.where)

    def _find(self) -> Any | None:
        # The name filter matches prefixes too.
        for s in self.client.services.list(filters={"name": self.service}):
            if s.name == self.service:
                return s
        return None

    def _ensure_service(self) -> None:
        svc = self._find()
        if svc is not None:
            labels = svc.attrs["Spec"].get("Labels") or {}
            if any(labels.get(k) != v for k, v in self._labels().items()):
                raise BackendError(
                    f"swarm_service: service {self.service!r} exists but is not labelled "
                    f"{LABEL_SCALER}={self.fleet}; refusing to take it over"
                )
            if "Replicated" not in svc.attrs["Spec"].get("Mode", {}):
                raise BackendError(f"swarm_service: {self.service!r} is not a replicated service")
            n = self._replicas(svc)
            log.info("swarm service %s exists (%d replicas); adopting it", self.service, n)
            return
        host = self.network == "host"
        env = self.spec.env() | {
            # Service templates: each task gets its own handler id.
            "TICKSCALE_HANDLER_HANDLER_ID": "{{.Task.Name}}",
            # On the host network replicas on one node would fight over one
            # port: any free port then, and no port-based health check.
            "TICKSCALE_HANDLER_METRICS_PORT": "0" if host else str(CONTAINER_METRICS_PORT),
            "TICKSCALE_METRICS_PORT": "0" if host else str(CONTAINER_METRICS_PORT),
        }
        kwargs: dict[str, Any] = {
            "name": self.service,
            # A service's "command" replaces the image ENTRYPOINT; args are its CMD.
            "args": ["handler"],
            "env": [f"{k}={v}" for k, v in env.items()],
            "labels": self._labels(),
            "container_labels": self._labels()
            | ({} if host else {LABEL_METRICS_PORT: str(CONTAINER_METRICS_PORT)}),
            "mode": ServiceMode("replicated", replicas=0),
            "stop_grace_period": int(self.stop_grace_s * 1e9),
            # Swarm keeps the replica count itself; the delay stops a crashing
            # handler from spinning.
            "restart_policy": RestartPolicy(condition="any", delay=int(5e9)),
            "read_only": True,
            "log_driver": "json-file",
            "log_driver_options": {"max-size": "10m", "max-file": "3"},
        }
        if self.spec.secrets:
            kwargs["secrets"] = [
                self._secret(file, name) for file, name in self.spec.secrets.items()
            ]
        if host:
            kwargs["healthcheck"] = Healthcheck(test=["NONE"])
        if self.network:
            kwargs["networks"] = [self.network]
        resources: dict[str, int] = {}
        if self.shape.cpus:
            resources["cpu_limit"] = int(self.shape.cpus * 1e9)
        if self.shape.mem_mb:
            resources["mem_limit"] = self.shape.mem_mb * 1024 * 1024
        if resources:
            kwargs["resources"] = Resources(**resources)
        self.client.services.create(self.image, **kwargs)
        log.info("created swarm service %s (0 replicas)", self.service)

    def _secret(self, file: str, name: str) -> SecretReference:
        """The swarm secret ``name`` as /run/secrets/``file``, readable by the image's user only."""
        try:
            secret = self.client.secrets.get(name)
        except NotFound as e:
            raise BackendError(
                f"handler_secrets: no swarm secret {name!r} (create it with `docker secret create`)"
            ) from e
        return SecretReference(secret.id, name, filename=file, uid=_UID, gid=_UID, mode=0o400)

    def _service(self) -> Any:
        svc = self._find()
        if svc is None:
            raise BackendError(f"swarm_service: service {self.service!r} has disappeared")
        return svc

    @staticmethod
    def _replicas(svc: Any) -> int:
        return int(svc.attrs["Spec"]["Mode"]["Replicated"].get("Replicas", 0))

    def _scale_by(self, delta: int) -> tuple[int, int]:
        return retry_sync(
            lambda: self._scale_once(delta), what=f"update swarm service {self.service}",
            attempts=_SCALE_RETRIES, first_s=0.05, max_s=1.0, retry_on=_out_of_sequence, log=log,
        )  # fmt: skip

    def _scale_once(self, delta: int) -> tuple[int, int]:
        svc = self._service()
        old = self._replicas(svc)
        new = max(old + delta, 0)
        if new == old:
            return old, new
        svc.scale(new)
        log.info("swarm service %s: replicas %d -> %d", self.service, old, new)
        return old, new

    def _running_tasks(self) -> int:
        """Tasks whose containers may still run, whatever their desired state."""
        svc = self._find()
        if svc is None:
            return 0
        live = _STARTING | {"running"}
        return sum(1 for t in svc.tasks() if (t.get("Status") or {}).get("State") in live)

    def _remove_service(self) -> None:
        svc = self._find()
        if svc is not None:
            svc.remove()
            log.info("removed swarm service %s", self.service)

    def _tasks(self) -> builtins.list[HandlerInstance]:
        svc = self._service()
        live: builtins.list[tuple[float, HandlerInstance]] = []
        for t in svc.tasks(filters={"desired-state": "running"}):
            status = t.get("Status") or {}
            state = status.get("State", "")
            if state == "running":
                shown = "running"
            elif state in _STARTING:
                shown = "starting"
            else:  # failed, rejected, shutdown...: Swarm replaces it
                continue
            created = parse_docker_time(t.get("CreatedAt"))
            started = parse_docker_time(status.get("Timestamp")) or created
            name = f"{self.service}.{t.get('Slot', '?')}"
            live.append((created, HandlerInstance(t["ID"], name, shown, started)))
        live.sort(key=lambda x: x[0])
        return [h for _, h in live]

    def _health(self) -> BackendHealth:
        self.client.ping()
        svc = self._service()
        tasks = self._tasks()
        running = sum(1 for t in tasks if t.state == "running")
        replicas = self._replicas(svc)
        return BackendHealth(
            True,
            f"Swarm service {self.service}: {running}/{replicas} replicas running",
            {
                "replicas": str(replicas),
                "running": str(running),
                "starting": str(len(tasks) - running),
                "engine": self.where,
            },
        )


def _check_overlay(client: Any, network: str | None, where: str) -> None:
    """A service's network must be an overlay (or the host's); BackendError otherwise."""
    if network is None or network == "host":
        return
    try:
        net = client.networks.get(network)
    except NotFound as e:
        raise BackendError(f"network: no network {network!r} on {where}") from e
    driver, scope = net.attrs.get("Driver"), net.attrs.get("Scope")
    if driver != "overlay" or scope != "swarm":
        raise BackendError(
            f"network: {network!r} is a {driver}/{scope} network; a swarm service "
            "needs an overlay network (or host)"
        )
