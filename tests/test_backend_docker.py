"""The docker and swarm backends against a real Docker engine.

Handler containers run the tickscale image on the host network, so they reach
the session's Kafka broker and Redis on 127.0.0.1 like the process handlers of
test_pipeline. Every test uses its own fleet name, so tests (and anything else
on the engine) never see each other's containers; everything a test starts is
removed afterwards.

Skipped when no Docker engine answers or the image is missing (build it with
``bash .ci/docker.sh``). Image under test: $TICKSCALE_IMAGE, default ``tickscale:dev``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.errors import APIError

from core.constants import LABEL_ROLE, LABEL_SCALER
from scaler.backends.base import BackendError, BackendUnreachable, HandlerInstance, HandlerSpec
from scaler.backends.docker import (
    LABEL_METRICS_PORT,
    LABEL_VERSION,
    ContainerShape,
    DockerBackend,
)
from scaler.backends.swarm import SwarmBackend
from scaler.handover import Handover, Pending
from tests.docker_utils import docker, engine_problem, swarm_state
from tests.pipeline_utils import run_verify, start_replay, summary
from tickscale.localstack.topics import TopicSet

IMAGE = os.environ.get("TICKSCALE_IMAGE", "tickscale:dev")
DAY = "2024-11-25"
ZERO = {"missing": 0, "duplicated": 0, "reordered": 0, "checksum_mismatch": 0}
# Away from the handler's default 9100 and the process backend's 9300+, which
# other local runs may be using.
PORT_BASE = 19100
ENGINE_SOCKET = "/var/run/docker.sock"


def _engine_problem() -> str | None:
    problem = engine_problem()
    if problem is None and docker("image", "inspect", IMAGE, check=False).returncode != 0:
        problem = f"image {IMAGE} not built: run `bash .ci/docker.sh`"
    return problem


_PROBLEM = _engine_problem()
if _PROBLEM:
    pytest.skip(f"needs a Docker engine: {_PROBLEM}", allow_module_level=True)

pytestmark = [pytest.mark.docker, pytest.mark.slow]


# Helpers ------------------------------------------------------------------------------


def inspect(ref: str) -> dict[str, Any] | None:
    r = docker("inspect", ref, check=False)
    if r.returncode != 0:
        return None
    out: dict[str, Any] = json.loads(r.stdout)[0]
    return out


def labelled(fleet: str) -> list[str]:
    """Ids of every container, in any state, labelled for ``fleet``."""
    r = docker("ps", "-aq", "--no-trunc", "--filter", f"label={LABEL_SCALER}={fleet}")
    return r.stdout.split()


async def wait_for(
    what: str, check: Callable[[], Awaitable[bool]], within_s: float = 90, every: float = 0.5
) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s:.0f}s waiting for {what}")
        await asyncio.sleep(every)


def metrics_port(cid: str) -> int:
    c = inspect(cid)
    assert c is not None, cid
    return int(c["Config"]["Labels"][LABEL_METRICS_PORT])


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return int(r.status)
    except OSError:
        return 0


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body = r.read().decode()
    return sum(
        float(m.group(2))
        for line in body.splitlines()
        if (m := re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line))
    )


async def wait_ready(cids: list[str], within_s: float = 120) -> None:
    async def ready() -> bool:
        ports = [metrics_port(c) for c in cids]
        codes = await asyncio.gather(*(asyncio.to_thread(http_status, p, "/readyz") for p in ports))
        return all(code == 200 for code in codes)

    await wait_for(f"handlers {cids} ready", ready, within_s)


def logs(cids: list[str]) -> str:
    return "\n".join(
        f"--- {c[:12]}\n" + docker("logs", "--tail", "40", c, check=False).stderr for c in cids
    )


# Fixtures -----------------------------------------------------------------------------


@pytest.fixture
def fleet() -> Iterator[str]:
    """A scaler name private to this test; its containers are removed afterwards."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    for fl in (name, f"{name}-other"):
        ids = labelled(fl)
        if ids:
            docker("rm", "-f", *ids, check=False)


@pytest.fixture
def spec(topics: TopicSet, redis_url: str) -> HandlerSpec:
    return HandlerSpec(
        bootstrap=topics.bootstrap,
        in_topic=topics.raw,
        out_topic=topics.ticks,
        deadletter_topic=topics.deadletter,
        group=topics.group,
        redis_url=redis_url,
        # As the process handlers of test_pipeline: a crashed member is noticed sooner.
        extra_env={"TICKSCALE_HANDLER_SESSION_TIMEOUT_MS": "6000"},
    )


MakeBackend = Callable[..., Awaitable[DockerBackend]]


@pytest.fixture
async def make_backend(spec: HandlerSpec, fleet: str) -> AsyncIterator[MakeBackend]:
    made: list[DockerBackend] = []

    async def factory(**kw: Any) -> DockerBackend:
        args: dict[str, Any] = {
            "image": IMAGE,
            "name": fleet,
            "shape": ContainerShape("host", cpus=0.5, mem_mb=256, host_port_base=PORT_BASE),
            "stop_grace_s": 30.0,
        } | kw
        b = DockerBackend(spec, **args)
        made.append(b)
        await b.start()
        return b

    yield factory
    for b in made:
        await b.close()


@pytest.fixture
def decoys(fleet: str) -> Iterator[list[str]]:
    """Containers (by name) a test starts beside the fleet; removed afterwards."""
    names: list[str] = []
    yield names
    if names:
        docker("rm", "-f", *names, check=False)


def run_decoy(decoys: list[str], labels: dict[str, str], command: str) -> str:
    name = f"tickscale-decoy-{uuid.uuid4().hex[:10]}"
    decoys.append(name)
    args = ["run", "-d", "--name", name, "--network", "none", "--entrypoint", "sleep"]
    for k, v in labels.items():
        args += ["--label", f"{k}={v}"]
    docker(*args, IMAGE, command)
    return name


# Docker backend -----------------------------------------------------------------------


async def test_add_list_remove_touch_only_own_containers(
    make_backend: MakeBackend, fleet: str, spec: HandlerSpec, decoys: list[str]
) -> None:
    other = {LABEL_ROLE: "handler", LABEL_SCALER: f"{fleet}-other"}
    plain = run_decoy(decoys, {}, "600")
    other_running = run_decoy(decoys, other, "600")
    other_exited = run_decoy(decoys, other, "0")
    b = await make_backend()

    ids = await b.add(2)
    assert len(ids) == 2 and len(set(ids)) == 2

    listed: list[HandlerInstance] = []

    async def both_running() -> bool:
        nonlocal listed
        listed = await b.list()
        return [h.state for h in listed] == ["running", "running"]

    await wait_for("2 running handler containers", both_running, within_s=120)
    assert [h.id for h in listed] == ids  # oldest (first created) first
    # Started concurrently, so start times need not follow creation order.
    assert all(h.started_at > 0 for h in listed)
    await wait_ready(ids)

    ports = set()
    for h in listed:
        c = inspect(h.id)
        assert c is not None
        assert c["Name"] == f"/{h.name}" and h.name.startswith(f"tickscale-handler-{fleet}-")
        labels = c["Config"]["Labels"]
        assert labels[LABEL_ROLE] == "handler" and labels[LABEL_SCALER] == fleet
        env = dict(e.split("=", 1) for e in c["Config"]["Env"])
        assert spec.env().items() <= env.items()
        assert env["TICKSCALE_HANDLER_HANDLER_ID"] == h.name
        assert env["TICKSCALE_HANDLER_METRICS_PORT"] == labels[LABEL_METRICS_PORT]
        ports.add(labels[LABEL_METRICS_PORT])
        assert c["Config"]["Cmd"] == ["handler"]
        host = c["HostConfig"]
        assert host["NetworkMode"] == "host"
        assert host["RestartPolicy"]["Name"] in ("", "no")
        assert host["NanoCpus"] == 500_000_000 and host["Memory"] == 256 * 1024 * 1024
    assert len(ports) == 2  # host network: each handler on its own metrics port

    removed = await b.remove(1)
    assert removed == [ids[1]]  # the youngest
    assert inspect(ids[1]) is None
    assert [h.id for h in await b.list()] == [ids[0]]

    # More than there are: stops what there is.
    assert await b.remove(5) == [ids[0]]
    assert await b.list() == []
    assert labelled(fleet) == []

    # Never listed, stopped, removed or reaped: not ours.
    for name, running in ((plain, True), (other_running, True), (other_exited, False)):
        c = inspect(name)
        assert c is not None, f"{name} was removed"
        assert c["State"]["Running"] is running, name


async def test_a_container_that_fails_to_start_is_removed_and_the_others_serve(
    make_backend: MakeBackend, fleet: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine refusing one start out of several (a runtime or cgroup error) is
    # not something a test can make happen to one container of a batch on its
    # own, so that one start is failed here; the engine does everything else.
    real_start = DockerBackend._start
    lock = threading.Lock()
    names: list[str] = []

    def start_all_but_the_second(created: tuple[Any, str]) -> BaseException | None:
        with lock:
            names.append(created[1])
            second = len(names) == 2
        if second:
            return APIError("cannot start container: injected runtime error")
        return real_start(created)

    monkeypatch.setattr(DockerBackend, "_start", staticmethod(start_all_but_the_second))
    b = await make_backend()
    with pytest.raises(BackendError, match=r"start handler containers on .*injected runtime error"):
        await b.add(3)

    # The container never started is gone (it would look "starting" forever and
    # count as a handler that never joins); the two that started serve.
    assert len(names) == 3
    left = labelled(fleet)
    assert len(left) == 2
    assert not any(names[1] in (inspect(c) or {}).get("Name", "") for c in left)
    await wait_ready(left)
    assert sorted(h.id for h in await b.list()) == sorted(left)

    monkeypatch.setattr(DockerBackend, "_start", staticmethod(real_start))
    (added,) = await b.add(1)
    await wait_ready([added])

    async def three_running() -> bool:
        return [h.state for h in await b.list()] == ["running"] * 3

    await wait_for("3 running handler containers", three_running, within_s=120)
    assert await b.remove(3)
    assert labelled(fleet) == []


async def test_sigterm_drained_removal_loses_nothing(
    make_backend: MakeBackend,
    topics: TopicSet,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    b = await make_backend(stop_grace_s=60.0)
    ids = await b.add(2)
    try:
        await wait_ready(ids)
    except AssertionError:
        raise AssertionError(logs(ids)) from None
    manifest = tmp_path / "m.json"
    replay_log = tmp_path / "replay.log"
    rp = start_replay(
        topics, manifest, replay_log,
        "--symbols", "6", "--seed", "7", "--date", DAY,
        "--from", "09:29", "--to", "09:34", "--speed", "15",
    )  # fmt: skip
    try:
        young, old = metrics_port(ids[1]), metrics_port(ids[0])

        async def young_consuming() -> bool:
            return metric(young, "tickscale_handler_messages_in_total") > 0

        await wait_for("the youngest handler to consume", young_consuming, within_s=60)
        name = next(h.name for h in await b.list() if h.id == ids[1])
        with caplog.at_level(logging.INFO, logger="scaler.backends.docker"):
            t0 = time.monotonic()
            assert await b.remove(1) == [ids[1]]
            took = time.monotonic() - t0
        # It left on SIGTERM (drained and committed), well before the SIGKILL.
        assert f"stopped handler container {name} (exit 0)" in caplog.text, caplog.text
        assert took < 50, took
        assert rp.poll() is None, "the replay ended before the removal: nothing was tested"
        assert [h.id for h in await b.list()] == [ids[0]]

        assert rp.wait(180) == 0, replay_log.read_text()[-2000:]
        rc, out = run_verify(topics, manifest)
        assert summary(out) == ZERO, out[-3000:]
        assert rc == 0, out[-3000:]
        # The survivor took over the leaver's partitions.
        assert metric(old, "tickscale_handler_rebalances_total") >= 2
    finally:
        if rp.poll() is None:
            rp.kill()
            rp.wait(10)


async def test_new_instance_adopts_and_reaps_killed(
    make_backend: MakeBackend, fleet: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = await make_backend()
    ids = await first.add(2)
    await first.close()

    second = await make_backend()  # e.g. a restarted scaler
    assert [h.id for h in await second.list()] == ids
    assert sorted(labelled(fleet)) == sorted(ids)  # adopted, nothing new started

    docker("kill", ids[0])
    live: list[str] = []

    async def reaped() -> bool:
        nonlocal live
        live = [h.id for h in await second.list()]
        return ids[0] not in live

    with caplog.at_level(logging.WARNING, logger="scaler.backends.docker"):
        await wait_for("the killed container to leave list()", reaped, within_s=60)
    assert live == [ids[1]]
    assert inspect(ids[0]) is None  # removed, not merely hidden
    assert "exit code 137" in caplog.text, caplog.text
    health = await second.health()
    assert health.ok and health.info["dead"] == "0", health
    assert int(health.info["running"]) + int(health.info["starting"]) == 1, health


async def test_start_names_the_bad_setting(fleet: str) -> None:
    spec = HandlerSpec("127.0.0.1:9", "raw", "ticks", "dl", "g", None)
    unreachable = "tcp://127.0.0.1:1"
    missing_image = f"tickscale:missing-{fleet}"
    quick = {"docker_host": unreachable, "connect_timeout_s": 1.0}  # waited for, briefly
    cases: list[tuple[DockerBackend | SwarmBackend, str, str]] = [
        (DockerBackend(spec, image=IMAGE, **quick), "docker_host", unreachable),  # type: ignore[arg-type]
        (SwarmBackend(spec, image=IMAGE, **quick), "docker_host", unreachable),  # type: ignore[arg-type]
        (DockerBackend(spec, image=missing_image, name=fleet), "image", missing_image),
        (
            DockerBackend(spec, image=IMAGE, shape=ContainerShape(f"no-{fleet}")),
            "network",
            f"no-{fleet}",
        ),
    ]
    for backend, setting, detail in cases:
        with pytest.raises(BackendError) as err:
            await backend.start()
        msg = str(err.value)
        assert msg.startswith(f"{setting}: ") and detail in msg, msg
        # Nothing answering is told apart from an answer that refuses the setting.
        assert isinstance(err.value, BackendUnreachable) == (setting == "docker_host"), msg
    assert labelled(fleet) == []


async def test_an_engine_that_answers_late_is_waited_for(
    spec: HandlerSpec, fleet: str, tmp_path: Path
) -> None:
    """The engine's socket appears 3 s after the backend starts (an engine restarting, or
    started after the scaler): the backend waits for it instead of failing its start."""
    sock = tmp_path / "late.sock"

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Each connection is passed through to the real engine, byte for byte.
        up_r, up_w = await asyncio.open_unix_connection(ENGINE_SOCKET)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    backend = DockerBackend(
        spec, image=IMAGE, name=fleet, docker_host=f"unix://{sock}", connect_timeout_s=60
    )
    starting = asyncio.create_task(backend.start())
    await asyncio.sleep(3.0)
    assert not starting.done(), starting
    server = await asyncio.start_unix_server(relay, path=str(sock))
    try:
        await asyncio.wait_for(starting, 60)
        assert await backend.list() == []  # a fleet of its own: nothing, but an answer
    finally:
        await backend.close()
        server.close()


# Swarm backend ------------------------------------------------------------------------


async def test_swarm_start_refuses_a_non_manager(fleet: str) -> None:
    if swarm_state()[0] != "inactive":
        pytest.skip("the engine is already part of a swarm")
    spec = HandlerSpec("127.0.0.1:9", "raw", "ticks", "dl", "g", None)
    with pytest.raises(BackendError, match=r"^docker_host: .*not a swarm manager"):
        await SwarmBackend(spec, image=IMAGE, name=fleet).start()


async def test_swarm_add_remove_change_running_tasks(
    swarm: None, spec: HandlerSpec, fleet: str
) -> None:
    service, b = _swarm(spec, fleet, stop_grace_s=15.0)
    try:
        await b.start()
        svc = json.loads(docker("service", "inspect", service).stdout)[0]["Spec"]
        assert svc["Mode"]["Replicated"]["Replicas"] == 0
        assert svc["Labels"] == {LABEL_ROLE: "handler", LABEL_SCALER: fleet, LABEL_VERSION: IMAGE}
        assert svc["TaskTemplate"]["ContainerSpec"]["StopGracePeriod"] == 15 * 10**9
        assert await b.list() == []

        def running_containers() -> int:
            r = docker(
                "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}",
                "--filter", "status=running",
            )  # fmt: skip
            return len(r.stdout.split())

        async def running(n: int) -> bool:
            tasks = await b.list()
            return [t.state for t in tasks] == ["running"] * n and running_containers() == n

        assert len(await b.add(2)) == 2
        await wait_for("2 running tasks", lambda: running(2), within_s=120)

        # Another instance adopts the labelled service as it is.
        again = SwarmBackend(
            spec, image=IMAGE, service=service, name=fleet, shape=ContainerShape("host")
        )
        await again.start()
        try:
            assert len(await again.list()) == 2
        finally:
            await again.close()

        assert len(await b.remove(1)) == 1
        await wait_for("1 running task", lambda: running(1), within_s=60)
        health = await b.health()
        assert health.ok and health.info["replicas"] == "1", health

        # As on the scaler's exit: the last task drains, then the service goes.
        assert len(await b.remove(1)) == 1
        await b.retire()
        assert running_containers() == 0
        assert docker("service", "inspect", service, check=False).returncode != 0
    finally:
        await b.close()
        docker("service", "rm", service, check=False)

        async def gone() -> bool:
            r = docker("ps", "-aq", "--filter", f"label=com.docker.swarm.service.name={service}")
            return not r.stdout.split()

        with contextlib.suppress(AssertionError):
            await wait_for("the service's containers to go", gone, within_s=60)


class _NoGroup:
    """The handover's group reader, for a change whose old handler is already gone:
    that path never reads the group."""

    async def group_info(self) -> Any:
        raise AssertionError("the group was read")


async def test_swarm_releases_an_exited_told_tasks_slot_once(
    swarm: None, spec: HandlerSpec, fleet: str
) -> None:
    """A told task that left and exited by itself keeps its slot until its service is
    lowered; Swarm would start it again. A handover that first sees it gone (a scaler
    restarted mid-change) lowers the service, and asking again lowers nothing more."""
    service, b = _swarm(spec, fleet, stop_grace_s=15.0)

    def replicas() -> int:
        svc = json.loads(docker("service", "inspect", service).stdout)[0]
        return int(svc["Spec"]["Mode"]["Replicated"]["Replicas"])

    try:
        await b.start()
        # The old one exits by itself, as a told handler does once its replacement joined.
        old, new, _ = await _two_tasks_then_the_first_exits(b)
        pending = Pending([new], [old], time.time(), "step", announced=[old])
        out = await Handover(b, _NoGroup()).advance(pending, await b.list(), join_s=60)
        assert out is not None and out.joined, out
        assert replicas() == 1
        assert await b.remove_ids([old]) == []  # a resumed handover asks again
        assert replicas() == 1
        # Past Swarm's restart delay (5 s), the slot stayed released.
        await asyncio.sleep(8)
        assert [t.id for t in await b.list()] == [new]
    finally:
        await b.close()
        docker("service", "rm", service, check=False)


async def test_swarm_retire_stops_a_slot_waiting_out_its_restart_delay(
    swarm: None, spec: HandlerSpec, fleet: str
) -> None:
    """On the scaler's exit every handler goes: one that had just exited, its slot
    waiting out Swarm's restart delay, is not in the list the exit's scale-in counts;
    it must not start again and hold the services in place."""
    service, b = _swarm(spec, fleet, stop_grace_s=10.0)
    try:
        await b.start()
        _, _, listed = await _two_tasks_then_the_first_exits(b)
        assert len(listed) == 1, listed  # the replacement waits out the delay unlisted
        await b.remove(len(listed))  # as Scaler.stop does
        await b.retire()
        assert docker("service", "inspect", service, check=False).returncode != 0
    finally:
        await b.close()
        docker("service", "rm", service, check=False)


def _swarm(spec: HandlerSpec, fleet: str, stop_grace_s: float) -> tuple[str, SwarmBackend]:
    """The fleet's service name, and its backend (not started)."""
    service = f"tickscale-handlers-{fleet}"
    return service, SwarmBackend(
        spec, image=IMAGE, service=service, name=fleet,
        shape=ContainerShape("host", cpus=0.5, mem_mb=256), stop_grace_s=stop_grace_s,
    )  # fmt: skip


async def _two_tasks_then_the_first_exits(
    b: SwarmBackend,
) -> tuple[str, str, list[HandlerInstance]]:
    """Two running tasks; then the first is stopped from outside Swarm (SIGTERM: it
    drains and exits 0), so its slot is left to Swarm's restart. Their ids, and the
    backend's list as soon as the first has left it (within the restart delay)."""
    first, second = await b.add(2)

    async def running() -> bool:
        return [t.state for t in await b.list()] == ["running", "running"]

    await wait_for("2 running tasks", running, within_s=120)
    cid = docker("ps", "-q", "--filter", f"label=com.docker.swarm.task.id={first}").stdout
    docker("stop", cid.strip())
    listed: list[HandlerInstance] = []

    async def exited() -> bool:
        listed[:] = await b.list()
        return first not in {t.id for t in listed}

    await wait_for("Swarm to see the task exit", exited, within_s=30, every=0.1)
    return first, second, listed
