"""What the docker and swarm rollout tests share: the two images built from the one under
test (a good second version and a faulty one; nothing is pulled), and the scenario run
against a scaler of either backend: promote the good one, roll back the faulty one, the
ledger exact and the steps in the audit stream.

Image under test: $TICKSCALE_IMAGE (default ``tickscale:dev``); it must hold this
checkout's handler (the guard reads figures older images do not report).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

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


def image_problem() -> str | None:
    """Why the rollout images cannot be built here, or None."""
    problem = engine_problem()
    if problem is None and docker("image", "inspect", IMAGE, check=False).returncode != 0:
        problem = f"image {IMAGE} not built: run `bash .ci/docker.sh`"
    return problem


def build_images(ctx: Path) -> tuple[str, str]:
    """(good, faulty): the image under test relabelled, and one whose handler also
    dead-letters every tenth record (tests/rollout_faulty_handler.py)."""
    tag = uuid.uuid4().hex[:8]
    good, faulty = f"tickscale-rollout:good-{tag}", f"tickscale-rollout:faulty-{tag}"
    (ctx / "good.Dockerfile").write_text(f"FROM {IMAGE}\nLABEL io.tickscale.test=good\n")
    shutil.copy(Path(__file__).with_name("rollout_faulty_handler.py"), ctx / "faulty.py")
    (ctx / "faulty.Dockerfile").write_text(
        f"FROM {IMAGE}\nCOPY faulty.py /opt/faulty/faulty.py\n"
        'ENTRYPOINT ["python3", "/opt/faulty/faulty.py"]\n'
    )
    for name, file in ((good, "good.Dockerfile"), (faulty, "faulty.Dockerfile")):
        docker("build", "-q", "-t", name, "-f", str(ctx / file), str(ctx), timeout=300)
    return good, faulty


def running_versions(fleet: str) -> list[str]:
    """The versions of the fleet's running handler containers (Swarm tasks included)."""
    out = docker("ps", "--filter", f"label={LABEL_SCALER}={fleet}", "--format",
                 f'{{{{.Label "{LABEL_VERSION}"}}}}').stdout  # fmt: skip
    return sorted(out.split())


def wait_until(
    what: str, pred: Callable[[], bool], within_s: float, seen: Callable[[], object] = list
) -> None:
    """Swarm stops tasks after the scaler lowered a count: what is seen lags a little.
    ``seen()`` is what the failure shows beside ``what`` (what was there instead)."""
    deadline = time.monotonic() + within_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s:g}s: {what}; seen {seen()}")
        time.sleep(0.5)


async def promote_then_roll_back(
    sc: ScalerProc, topics: TopicSet, redis_url: str, tmp_path: Path, name: str,
    images: tuple[str, str], versions: Callable[[], list[str]],
    midway: Callable[[], Awaitable[None]] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Under a replay: the good image promoted, the faulty one rolled back, the ledger
    exact, each step in the audit stream; ``versions()`` (the running handlers'
    versions) shows only the good one after each. ``midway`` runs beside the good
    rollout (a scaler restart). Returns the fleet's rollout events."""
    good, faulty = images
    await asyncio.to_thread(sc.wait_for, "tickscale_scaler_running_handlers",
                            lambda v: v >= 2, 120)  # fmt: skip
    manifest = tmp_path / "manifest.json"
    rp = start_replay(topics, manifest, tmp_path / "replay.log", "--symbols", "20",
                      "--from", "09:30", "--to", "10:30", "--speed", "30")  # fmt: skip
    try:
        ok, _ = await asyncio.gather(
            asyncio.to_thread(_rollout, topics, redis_url, name, "--image", good, "--guard", GUARD),
            midway() if midway else asyncio.sleep(0),
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr + sc.log()[-3000:]
        await asyncio.to_thread(wait_until, f"only {good} running",
                                lambda: set(versions()) == {good}, 60, versions)  # fmt: skip
        bad = await asyncio.to_thread(_rollout, topics, redis_url, name, "--image", faulty,
                                      "--guard", GUARD)  # fmt: skip
        assert bad.returncode == 1, bad.stdout + bad.stderr + sc.log()[-3000:]
        assert "rolled back: deadletters per 1,000 records" in bad.stderr
        await asyncio.to_thread(wait_until, f"only {good} running again",
                                lambda: set(versions()) == {good}, 60, versions)  # fmt: skip
        assert await asyncio.to_thread(rp.wait, 300) == 0
    finally:
        if rp.poll() is None:
            rp.kill()
    assert await _verify_ticks(topics, manifest) == ZERO
    events = await rollout_events(redis_url, name)
    steps = [(e["version"], e["event"]) for e in events]
    first = [ev for v, ev in steps if v == good]
    assert first[:3] == ["canary", "window", "passed"] and first[-1] == "promoted", steps
    # One step per old handler left beside the canary, each replacing one.
    details = [e["detail"] for e in events if (e["version"], e["event"]) == (good, "step")]
    assert [d["old_left"] for d in details] == list(range(len(details)))[::-1], details
    assert details and all(d["started"] == 1 for d in details), details
    assert [ev for v, ev in steps if v == faulty] == [
        "canary", "window", "rolling_back", "rolled_back"
    ], steps  # fmt: skip
    return events


async def rollout_events(redis_url: str, name: str) -> list[dict[str, Any]]:
    r = Redis.from_url(redis_url)
    try:
        return await read_events(r, f"{REDIS_SCALER_EVENTS}:{name}", kind="rollout")
    finally:
        await r.aclose()
