"""Handler rollouts on the swarm backend: the canary and the promoted version run as a
second service beside the fleet's (scaler/backends/swarm.py), on a one-node swarm (the
``swarm`` fixture), tasks on the host network beside the session's broker and Redis.

The good image is promoted across a scaler restart (the new scaler finds both services
by their labels and carries the promotion on), the faulty one is rolled back; the
ledger is exact and only the promoted version's service is left.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest

from core.constants import LABEL_SCALER
from scaler.backends.base import HandlerVersion
from scaler.backends.swarm_spec import service_name
from tests.docker_utils import docker
from tests.rollout_utils import (
    IMAGE,
    image_problem,
    promote_then_roll_back,
    rollout_events,
    running_versions,
    wait_until,
)
from tests.test_scaler import ScalerProc
from tickscale.localstack.topics import TopicSet

_PROBLEM = image_problem()
if _PROBLEM:
    pytest.skip(f"needs a Docker engine: {_PROBLEM}", allow_module_level=True)

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _services(fleet: str) -> list[str]:
    out = docker("service", "ls", "--filter", f"label={LABEL_SCALER}={fleet}",
                 "--format", "{{.Name}}").stdout  # fmt: skip
    return sorted(out.split())


def _tasks(fleet: str) -> str:
    """Each of the fleet's services with its tasks' desired and current states."""
    names = _services(fleet)
    fmt = "{{.Name}} {{.Image}} {{.DesiredState}} {{.CurrentState}} {{.Error}}"
    return (
        docker("service", "ps", "--no-trunc", "--format", fmt, *names, check=False).stdout
        if names
        else "(no services)"
    )


async def test_swarm_rollout_promotes_across_a_restart_and_rolls_back_the_faulty_one(
    swarm: None, topics: TopicSet, redis_url: str, tmp_path: Path,
    rollout_images: tuple[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    good, faulty = rollout_images
    name = f"s{os.getpid()}{int(time.time()) % 100000}"
    base = f"tickscale-handlers-{name}"
    good_service = service_name(base, HandlerVersion(good, image=good), IMAGE)
    args = (
        "--backend", "swarm", "--image", IMAGE, "--network", "host", "--name", name,
        "--min-handlers", "2", "--max-handlers", "3", "--calendar", "none",
        "--scale-down-window", "600", "--handler-cpus", "0.5",
    )  # fmt: skip
    monkeypatch.setenv("TICKSCALE_SCALER_SWARM_SERVICE", base)
    # The first scaler leaves its handlers running when it stops: the second adopts them.
    monkeypatch.setenv("TICKSCALE_SCALER_STOP_HANDLERS_ON_EXIT", "false")
    procs = [ScalerProc(topics, redis_url, tmp_path, *args)]

    async def restart_in_the_canary() -> None:
        async def canary_judged() -> bool:
            return any(e["event"] == "window" for e in await rollout_events(redis_url, name))

        deadline = time.monotonic() + 120
        while not await canary_judged():
            assert time.monotonic() < deadline, procs[0].log()[-3000:]
            await asyncio.sleep(0.5)
        # Both services run now: the fleet's and the canary's.
        assert _services(name) == sorted([base, good_service])
        assert await asyncio.to_thread(procs[0].stop) == 0, procs[0].log()[-3000:]
        monkeypatch.setenv("TICKSCALE_SCALER_STOP_HANDLERS_ON_EXIT", "true")
        procs.append(ScalerProc(topics, redis_url, tmp_path, *args))

    try:
        await promote_then_roll_back(
            procs[0], topics, redis_url, tmp_path, name, rollout_images,
            lambda: running_versions(name), restart_in_the_canary,
        )  # fmt: skip
        assert len(procs) == 2
        both = procs[0].log() + procs[1].log()
        # Each old task, told through Redis, left and exited by itself before its service
        # was scaled down (scaler.handover), so the scale-down took its slot.
        assert "after the new one joined" not in both, both[-4000:]
        assert re.findall(r"handover \((?:canary|step)\): in the rebalance", both), both[-4000:]
        log = procs[1].log()
        assert "adopting them" in log and good_service in log, log[-3000:]
        # The old service went after the promotion, the faulty canary's after its rollback.
        await asyncio.to_thread(wait_until, f"only {good_service} left",
                                lambda: _services(name) == [good_service], 60)  # fmt: skip
        assert faulty not in " ".join(running_versions(name))
    except AssertionError as e:
        # What a red run needs first: the tasks Swarm holds, and the live scaler's account.
        raise AssertionError(f"{e}\n{_tasks(name)}\n{procs[-1].log()[-6000:]}") from e
    finally:
        rcs = [p.stop() for p in procs]
        left = _services(name)
        if left:
            docker("service", "rm", *left, check=False)
        assert rcs == [0] * len(rcs), procs[-1].log()[-3000:]
        assert not left, left
