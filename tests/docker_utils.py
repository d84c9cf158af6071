"""Docker engine helpers shared by the tests that need one (and the ``swarm`` fixture)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess


def _cli() -> str | None:
    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    # The distribution's CLI: a newer one earlier on PATH may not match the engine.
    return "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")


DOCKER = _cli()


def docker(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    assert DOCKER is not None
    return subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, check=check, timeout=timeout
    )


@functools.cache
def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None."""
    if DOCKER is None:
        return "no docker CLI on PATH"
    try:
        r = subprocess.run([DOCKER, "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`docker info` failed: {e}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"`docker info` failed (no running engine? `bash .ci/docker.sh` starts one): {last}"
    return None


def swarm_state() -> tuple[str, bool]:
    """(LocalNodeState, whether this engine is a manager)."""
    info = json.loads(docker("info", "--format", "{{json .Swarm}}").stdout)
    return info.get("LocalNodeState", ""), bool(info.get("ControlAvailable"))
