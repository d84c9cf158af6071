"""Handler rollouts on the docker backend: two images built here from the one under test
(a good second version and a faulty one; nothing is pulled), the scaler running their
containers on the host network beside the session's broker and Redis.

Image under test: $TICKSCALE_IMAGE (default ``tickscale:dev``); it must hold this
checkout's handler (the guard reads figures older images do not report).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from core.constants import LABEL_SCALER, REDIS_SCALER_EVENTS
from scaler.audit import read_events
from scaler.backends.docker import LABEL_VERSION
from tests.docker_utils import docker, engine_problem
from tests.pipeline_utils import start_replay
from tests.test_rollout import GUARD, _rollout, _verify_ticks
from tests.test_scaler import ScalerProc
from tickscale.localstack.topics import TopicSet

IMAGE = os.environ.get("TICKSCALE_IMAGE", "tickscale:dev")
ZERO = {"missing": 0, "duplicated": 0, "reordered": 0, "checksum_mismatch": 0}


def _problem() -> str | None:
    problem = engine_problem()
    if problem is None and docker("image", "inspect", IMAGE, check=False).returncode != 0:
        problem = f"image {IMAGE} not built: run `bash .ci/docker.sh`"
    return problem


_PROBLEM = _problem()
if _PROBLEM:
    pytest.skip(f"needs a Docker engine: {_PROBLEM}", allow_module_level=True)

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(good, faulty): the image under test relabelled, and one whose handler also
    dead-letters every tenth record."""
    tag = uuid.uuid4().hex[:8]
    good, faulty = f"tickscale-rollout:good-{tag}", f"tickscale-rollout:faulty-{tag}"
    ctx = tmp_path_factory.mktemp("images")
    (ctx / "good.Dockerfile").write_text(f"FROM {IMAGE}\nLABEL io.tickscale.test=good\n")
    shutil.copy(Path(__file__).with_name("rollout_faulty_handler.py"), ctx / "faulty.py")
    (ctx / "faulty.Dockerfile").write_text(
        f"FROM {IMAGE}\nCOPY faulty.py /opt/faulty/faulty.py\n"
        'ENTRYPOINT ["python3", "/opt/faulty/faulty.py"]\n'
    )
    for name, file in ((good, "good.Dockerfile"), (faulty, "faulty.Dockerfile")):
        docker("build", "-q", "-t", name, "-f", str(ctx / file), str(ctx), timeout=300)
    yield good, faulty
    docker("rmi", "-f", good, faulty, check=False)


def _versions(fleet: str) -> list[str]:
    out = docker("ps", "--filter", f"label={LABEL_SCALER}={fleet}", "--format",
                 f'{{{{.Label "{LABEL_VERSION}"}}}}').stdout  # fmt: skip
    return sorted(out.split())


async def test_docker_rollout_promotes_the_good_image_and_rolls_back_the_faulty_one(
    topics: TopicSet, redis_url: str, tmp_path: Path, images: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    good, faulty = images
    name = f"d{os.getpid()}{int(time.time()) % 100000}"
    monkeypatch.setenv("TICKSCALE_SCALER_STOP_HANDLERS_ON_EXIT", "true")
    sc = ScalerProc(
        topics, redis_url, tmp_path, "--backend", "docker", "--image", IMAGE,
        "--network", "host", "--name", name, "--min-handlers", "2", "--max-handlers", "3",
        "--calendar", "none", "--scale-down-window", "600",
    )  # fmt: skip
    rp = None
    try:
        await asyncio.to_thread(sc.wait_for, "tickscale_scaler_running_handlers",
                                lambda v: v >= 2, 120)  # fmt: skip
        manifest = tmp_path / "manifest.json"
        rp = start_replay(topics, manifest, tmp_path / "replay.log", "--symbols", "20",
                          "--from", "09:30", "--to", "10:30", "--speed", "30")  # fmt: skip
        ok = await asyncio.to_thread(_rollout, topics, redis_url, name, "--image", good,
                                     "--guard", GUARD)  # fmt: skip
        assert ok.returncode == 0, ok.stdout + ok.stderr + sc.log()[-3000:]
        assert set(_versions(name)) == {good}
        bad = await asyncio.to_thread(_rollout, topics, redis_url, name, "--image", faulty,
                                      "--guard", GUARD)  # fmt: skip
        assert bad.returncode == 1, bad.stdout + bad.stderr + sc.log()[-3000:]
        assert "rolled back: deadletters per 1,000 records" in bad.stderr
        assert set(_versions(name)) == {good}
        assert await asyncio.to_thread(rp.wait, 300) == 0
        assert await _verify_ticks(topics, manifest) == ZERO
        r = Redis.from_url(redis_url)
        try:
            events = await read_events(r, f"{REDIS_SCALER_EVENTS}:{name}", kind="rollout")
        finally:
            await r.aclose()
        steps = [(e["version"], e["event"]) for e in events]
        assert [ev for v, ev in steps if v == good][-1] == "promoted", steps
        assert [ev for v, ev in steps if v == faulty][-1] == "rolled_back", steps
    finally:
        if rp is not None and rp.poll() is None:
            rp.kill()
        rc = sc.stop()
        left = docker("ps", "-aq", "--filter", f"label={LABEL_SCALER}={name}").stdout.split()
        if left:
            docker("rm", "-f", *left, check=False)
        assert rc == 0, sc.log()[-3000:]
        assert not left
