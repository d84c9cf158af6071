"""Handler rollouts on the docker backend: the good and the faulty image built from the
one under test (tests/rollout_utils.py), the scaler running their containers on the host
network beside the session's broker and Redis."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from core.constants import LABEL_SCALER
from tests.docker_utils import docker
from tests.rollout_utils import IMAGE, image_problem, promote_then_roll_back, running_versions
from tests.test_scaler import ScalerProc
from tickscale.localstack.topics import TopicSet

_PROBLEM = image_problem()
if _PROBLEM:
    pytest.skip(f"needs a Docker engine: {_PROBLEM}", allow_module_level=True)

pytestmark = [pytest.mark.docker, pytest.mark.slow]


async def test_docker_rollout_promotes_the_good_image_and_rolls_back_the_faulty_one(
    topics: TopicSet, redis_url: str, tmp_path: Path, rollout_images: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    name = f"d{os.getpid()}{int(time.time()) % 100000}"
    monkeypatch.setenv("TICKSCALE_SCALER_STOP_HANDLERS_ON_EXIT", "true")
    sc = ScalerProc(
        topics, redis_url, tmp_path, "--backend", "docker", "--image", IMAGE,
        "--network", "host", "--name", name, "--min-handlers", "2", "--max-handlers", "3",
        "--calendar", "none", "--scale-down-window", "600",
    )  # fmt: skip
    try:
        await promote_then_roll_back(
            sc, topics, redis_url, tmp_path, name, rollout_images, lambda: running_versions(name)
        )
    finally:
        rc = sc.stop()
        left = docker("ps", "-aq", "--filter", f"label={LABEL_SCALER}={name}").stdout.split()
        if left:
            docker("rm", "-f", *left, check=False)
        assert rc == 0, sc.log()[-3000:]
        assert not left
