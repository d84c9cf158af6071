"""Handlers as the replicas of Docker Swarm services, one service per handler version.

The scaler only changes replica counts; Swarm places the tasks, replaces
crashed ones, and on scale-in picks the tasks to stop and sends them SIGTERM
with the stop grace period. The fleet's service (``swarm_service``) is created
with zero replicas on first start; every service carries the scaler's labels
and ``io.tickscale.version``, and an existing service of that name without them
is refused rather than taken over.

Rollouts: a service runs one image, so a version other than the one the
scaler was started with runs as a second service, ``<swarm_service>-<version
slug>`` (``swarm_spec``), made from the same settings. ``list`` returns the
tasks of all the fleet's services, each with its service's version, which is
how the rollout controller tells canary from fleet; a restarted scaler finds
them all by their labels. ``add`` grows the service of the version asked for
(creating it) and returns the ids of the tasks Swarm made for it, so the
handover can watch them join. A service scaled to zero that no longer runs the
current version is removed once its tasks have gone: the old one after a
promotion, the canary's after a rollback.

``remove_ids`` cannot stop one particular task. Swarm has no call to remove a
task of a replicated service: scaling down is the only way, and Swarm picks
which tasks go, preferring tasks that are not running. Stopping the task's
container through the engine and lowering the replicas is two calls, never
one: stopped first, Swarm sees the task fail and (restart policy ``any``, 5 s
delay) starts a replacement; lowered first, Swarm has already picked. So
``remove_ids`` lowers each named task's *service* by the number of its tasks
named, counting a named task that has already exited (its slot is still the
service's). A rollout step uses that: the old task, told through Redis, leaves
the group and exits by itself, and the handover lowers its service only then
(``scaler.handover``), so the scale-down takes the exited task's slot, not a
running one. An exited task is counted only while its slot is still held (a
task of that slot meant to run: Swarm's replacement, made at once and started
after the restart delay), so asking again, as a handover resumed after a
restart or an error does, lowers nothing twice. Elsewhere (the policy scaling
in during a rollout, a rollback) any task of the service will do. The cost: a
scaler that dies between a handover's stop and the state's save, and finds the
named old task still running, stops one old task more on resuming; the policy
scales the fleet back up.

A swarm spans machines, so the network must be an overlay (or ``host``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections import Counter
from typing import Any

from docker.errors import APIError, NotFound

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
    LABEL_VERSION,
    ContainerShape,
    EngineClient,
    check_image,
    engine_address,
    parse_docker_time,
    reach_engine,
)
from scaler.backends.swarm_spec import secret_refs, service_args, service_name

log = logging.getLogger(__name__)

# Task states before "running": the task exists and is on its way up.
_STARTING = {"new", "pending", "assigned", "accepted", "ready", "preparing", "starting"}
_SCALE_RETRIES = 5
# Beyond the stop grace period: Swarm's own lag between a task's exit and its state.
_RETIRE_MARGIN_S = 15.0
# How long ``add`` waits for Swarm to make the tasks it asked for (they exist
# long before they run; the handover needs their ids).
_TASKS_WAIT_S = 15.0


def _out_of_sequence(e: BaseException) -> bool:
    """Someone else updated the service since we read it: read it again and retry."""
    return isinstance(e, APIError) and "out of sequence" in str(e)


def _replicas(svc: Any) -> int:
    return int(svc.attrs["Spec"]["Mode"]["Replicated"].get("Replicas", 0))


def _service_of(task_name: str) -> str:
    """A task's name is ``<service>.<slot>.<task id>``."""
    return task_name.rsplit(".", 2)[0]


class SwarmBackend(EngineClient):
    name = "swarm"
    kind = "Swarm"
    # A scale-down stops a task Swarm picks (one not running first), never a chosen one.
    stops_chosen = False

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
        connect_timeout_s: float = 120.0,
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
        self.connect_timeout_s = connect_timeout_s
        self.base = HandlerVersion(image, image=image)  # runs in the service named `service`
        self.version = self.base
        self.where = engine_address(docker_host)
        self._client: Any = None
        # Replica changes are read-modify-write on the service specs.
        self._lock = asyncio.Lock()

    # Lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._client = await reach_engine(self.docker_host, self.connect_timeout_s)
        try:
            await self._call("check the swarm", _check_manager, self._client, self.where)
            await asyncio.to_thread(check_image, self._client, self.image, self.where)
            await self._call(
                "check the network", _check_overlay, self._client, self.network, self.where
            )
            await self._call("create the service", self._ensure_service)
        except BaseException:
            await self.close()
            raise

    async def retire(self) -> None:
        """Wait for the scaled-in tasks to drain, then remove the services: they hold the
        overlay network, and removing one while tasks still run would kill them. Every
        service goes to zero first: a slot whose task had exited, waiting out its restart
        delay, is not in the list the scale-in counted, and would start again."""
        async with self._lock:
            await self._call("scale the services", self._scale_all_to_zero)
        deadline = time.monotonic() + self.stop_grace_s + _RETIRE_MARGIN_S
        while await self._call("list service tasks", self._running_tasks):
            if time.monotonic() > deadline:
                raise BackendError(
                    f"swarm_service: tasks of {self.service!r} still running after "
                    f"{self.stop_grace_s + _RETIRE_MARGIN_S:.0f} s; service left in place"
                )
            await asyncio.sleep(0.5)
        await self._call("remove the services", self._remove_services)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.close)

    # Backend --------------------------------------------------------------------------

    async def list(self) -> builtins.list[HandlerInstance]:
        async with self._lock:
            return await self._call("list service tasks", self._list_and_reap)

    def set_version(self, version: HandlerVersion) -> None:
        if not version.image:
            raise BackendError(f"image: version {version.name} names no image")
        self.version = version

    async def add(self, n: int, version: HandlerVersion | None = None) -> builtins.list[str]:
        if n <= 0:
            return []
        version = version or self.version
        if not version.image:
            raise BackendError(f"image: version {version.name} names no image")
        if version.image != self.image:
            await self._call("check the image", check_image, self.client, version.image, self.where)
        async with self._lock:
            return await self._call("scale the service", self._grow, version, n)

    async def remove(self, n: int) -> builtins.list[str]:
        if n <= 0:
            return []
        async with self._lock:
            return await self._call("scale the service", self._shrink_any, n)

    async def remove_ids(self, ids: builtins.list[str]) -> builtins.list[str]:
        """Lower each named task's service by its count of named tasks (Swarm picks which
        of that service's tasks stop; see the module's docstring)."""
        async with self._lock:
            return await self._call("scale the service", self._shrink_ids, ids)

    async def announce_replacement(self, ids: builtins.list[str]) -> builtins.list[str]:
        # A task's container may be on another node: the announcement goes through Redis
        # (scaler.handover), and the handover waits for the told task to exit.
        return []

    # Engine side (worker threads) ------------------------------------------------------

    def _services(self) -> builtins.list[Any]:
        """Every service labelled for this fleet, whatever its version."""
        filters = {"label": [f"{k}={v}" for k, v in self._labels().items()]}
        return list(self.client.services.list(filters=filters))

    def _find(self, name: str) -> Any | None:
        """The service ``name``, ours or not (BackendError if it is someone else's)."""
        # The name filter matches prefixes too.
        for s in self.client.services.list(filters={"name": name}):
            if s.name == name:
                labels = s.attrs["Spec"].get("Labels") or {}
                if any(labels.get(k) != v for k, v in self._labels().items()):
                    raise BackendError(
                        f"swarm_service: service {name!r} exists but is not labelled "
                        f"{LABEL_SCALER}={self.fleet}; refusing to take it over"
                    )
                if "Replicated" not in s.attrs["Spec"].get("Mode", {}):
                    raise BackendError(f"swarm_service: {name!r} is not a replicated service")
                return s
        return None

    def _version_of(self, svc: Any) -> str:
        # Services made before versions were labelled ran the scaler's image.
        return str((svc.attrs["Spec"].get("Labels") or {}).get(LABEL_VERSION, self.base.name))

    def _ensure_service(self) -> None:
        svc = self._find(self.service)
        others = [s.name for s in self._services() if s.name != self.service]
        if svc is not None or others:
            log.info("swarm services of fleet %s exist (%s); adopting them", self.fleet,
                     ", ".join(([self.service] if svc is not None else []) + others))  # fmt: skip
            return
        self._create(self.service, self.base, 0)

    def _create(self, name: str, version: HandlerVersion, replicas: int) -> Any:
        kwargs = service_args(
            self.spec, self.shape, name=name, version=version, labels=self._labels(),
            replicas=replicas, stop_grace_s=self.stop_grace_s,
        )  # fmt: skip
        if self.spec.secrets:
            kwargs["secrets"] = secret_refs(self.client, self.spec.secrets)
        svc = self.client.services.create(version.image, **kwargs)
        log.info("created swarm service %s (%s, %d replicas)", name, version.name, replicas)
        return svc

    def _grow(self, version: HandlerVersion, n: int) -> builtins.list[str]:
        """Scale ``version``'s service up by n (creating it); the ids of its new tasks."""
        name = service_name(self.service, version, self.base.name)
        svc = self._find(name)
        if svc is None:
            before: set[str] = set()
            svc = self._create(name, version, n)
        else:
            before = {t["ID"] for t in svc.tasks()}
            self._scale_by(name, n)
        deadline = time.monotonic() + _TASKS_WAIT_S
        while True:
            new = [t for t in svc.tasks(filters={"desired-state": "running"})
                   if t["ID"] not in before]  # fmt: skip
            if len(new) >= n or time.monotonic() > deadline:
                new.sort(key=lambda t: parse_docker_time(t.get("CreatedAt")))
                return [t["ID"] for t in new[:n]]
            time.sleep(0.1)

    def _shrink_ids(self, ids: builtins.list[str]) -> builtins.list[str]:
        wanted = set(ids)
        named = [h for h in self._tasks() if h.id in wanted]
        per = Counter(_service_of(h.name) for h in named)
        # A named task no longer listed has exited on its own (a replaced handler leaves
        # and exits): its slot is still its service's, and Swarm would start it again.
        # Lowering the service takes that slot, which Swarm prefers to a running one.
        # Only while that slot is still held, though: lowered once already (a handover
        # resumed after a restart or an error), it must not be lowered again.
        gone = sorted(wanted - {h.id for h in named})
        ours = {svc.id: svc.name for svc in self._services()} if gone else {}
        exited = []
        for tid in gone:
            for t in self.client.api.tasks(filters={"id": tid}):
                if t.get("ServiceID") in ours and t["ID"] == tid and self._slot_held(t):
                    per[ours[t["ServiceID"]]] += 1
                    exited.append(tid)
        for svc, k in per.items():
            self._scale_by(svc, -k)
        return [h.id for h in named] + exited

    def _slot_held(self, task: dict[str, Any]) -> bool:
        """Whether an exited task's slot still counts in its service's replicas. Swarm
        makes the replacement at once (desired state ready, running after the restart
        delay) and drops it when a scale-down takes the slot; until Swarm has seen the
        exit, the exited task itself is still meant to run."""
        slot = task.get("Slot")
        tasks = self.client.api.tasks(filters={"service": task["ServiceID"]})
        return any(
            t.get("Slot") == slot and t.get("DesiredState") in ("ready", "running") for t in tasks
        )

    def _shrink_any(self, n: int) -> builtins.list[str]:
        """n fewer replicas, from services of other versions first (a rollout's leftovers)."""
        current = service_name(self.service, self.version, self.base.name)
        stopped: builtins.list[str] = []
        for svc in sorted(self._services(), key=lambda s: s.name == current):
            k = min(n - len(stopped), _replicas(svc))
            if k > 0:
                old, new = self._scale_by(svc.name, -k)
                stopped += [f"{svc.name}/replica-{r}" for r in range(old, new, -1)]
        return stopped

    def _scale_by(self, name: str, delta: int) -> tuple[int, int]:
        return retry_sync(
            lambda: self._scale_once(name, delta), what=f"update swarm service {name}",
            attempts=_SCALE_RETRIES, first_s=0.05, max_s=1.0, retry_on=_out_of_sequence, log=log,
        )  # fmt: skip

    def _scale_once(self, name: str, delta: int) -> tuple[int, int]:
        svc = self._find(name)
        if svc is None:
            raise BackendError(f"swarm_service: service {name!r} has disappeared")
        old = _replicas(svc)
        new = max(old + delta, 0)
        if new == old:
            return old, new
        svc.scale(new)
        log.info("swarm service %s: replicas %d -> %d", name, old, new)
        return old, new

    def _scale_all_to_zero(self) -> None:
        for svc in self._services():
            if _replicas(svc):
                self._scale_by(svc.name, -_replicas(svc))

    def _running_tasks(self) -> int:
        return sum(_live(s) for s in self._services())

    def _remove_services(self) -> None:
        for svc in self._services():
            with _gone():
                svc.remove()
            log.info("removed swarm service %s", svc.name)

    def _list_and_reap(self) -> builtins.list[HandlerInstance]:
        """The tasks; and a service of another version, scaled to zero and drained
        (the old one after a promotion, a rolled-back canary's), is removed."""
        current = service_name(self.service, self.version, self.base.name)
        for svc in self._services():
            if svc.name != current and _replicas(svc) == 0 and not _live(svc):
                with _gone():
                    svc.remove()
                log.info("removed swarm service %s (%s, drained)", svc.name, self._version_of(svc))
        return self._tasks()

    def _tasks(self) -> builtins.list[HandlerInstance]:
        live = [x for svc in self._services() for x in _tasks_of(svc, self._version_of(svc))]
        live.sort(key=lambda x: x[0])
        return [h for _, h in live]

    def _health(self) -> BackendHealth:
        self.client.ping()
        return _fleet_health(self._services(), self._tasks(), self.service, self.where)


def _fleet_health(
    services: builtins.list[Any], tasks: builtins.list[HandlerInstance], fleet: str, where: str
) -> BackendHealth:
    running = sum(1 for t in tasks if t.state == "running")
    replicas = sum(_replicas(s) for s in services)
    names = ", ".join(s.name for s in services) or fleet
    return BackendHealth(
        True,
        f"Swarm service {names}: {running}/{replicas} replicas running",
        {
            "replicas": str(replicas),
            "running": str(running),
            "starting": str(len(tasks) - running),
            "engine": where,
        },
    )


def _check_manager(client: Any, where: str) -> None:
    swarm = client.info().get("Swarm") or {}
    state = swarm.get("LocalNodeState", "?")
    if state != "active" or not swarm.get("ControlAvailable"):
        raise BackendError(
            f"docker_host: the engine at {where} is not a swarm manager "
            f"(swarm state {state!r}); point docker_host at a manager or use the docker backend"
        )


def _live(svc: Any) -> int:
    """Tasks whose containers may still run, whatever their desired state."""
    live = _STARTING | {"running"}
    return sum(1 for t in svc.tasks() if (t.get("Status") or {}).get("State") in live)


def _tasks_of(svc: Any, version: str) -> builtins.list[tuple[float, HandlerInstance]]:
    """(creation time, handler) of each task of ``svc`` meant to run."""
    out = []
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
        # The handler's id ({{.Task.Name}}): its group client id and figures key.
        name = f"{svc.name}.{t.get('Slot', '?')}.{t['ID']}"
        out.append((created, HandlerInstance(t["ID"], name, shown, started, version)))
    return out


def _gone() -> contextlib.suppress:
    """A service removed meanwhile (by another scaler's reap) is what we wanted."""
    return contextlib.suppress(NotFound)


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
