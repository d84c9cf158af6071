"""Docker engine helpers shared by the tests that need one (and the ``swarm`` fixture)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

# The distribution's CLI: a newer one earlier on PATH may not match the engine.
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")


def docker(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    assert DOCKER is not None
    return subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def swarm_state() -> tuple[str, bool]:
    """(LocalNodeState, whether this engine is a manager)."""
    info = json.loads(docker("info", "--format", "{{json .Swarm}}").stdout)
    return info.get("LocalNodeState", ""), bool(info.get("ControlAvailable"))
