"""The README's three-command rollout, on the compose stack as users start it.

A second handler image is built from the one under test (as ``docker build -t
tickscale:v2 .`` makes one), the Docker gate is restarted admitting it, and
``tickscale rollout --image`` runs inside the scaler's container while the
replay feeds the fleet: the canary passes the guard, every old handler is
replaced, and every tick of the day still arrives exactly once.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from scaler.backends.docker import LABEL_VERSION
from tests.docker_utils import docker
from tests.test_image import (
    E2E_MAX_HANDLERS,
    E2E_SETTINGS,
    IMAGE,
    NOT_HERE,
    TOOLS,
    _assert_compose_ledger,
    _compose_stack,
    _handlers,
    _state,
    _wait,
    image,  # noqa: F401 - the module's fixture: the image under test is built
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# Long enough a replay for the canary's guard window (2 market minutes, 6 s here)
# and one step per handler of the open's fleet, with the replay still running.
ROLLOUT_SETTINGS = E2E_SETTINGS | {"REPLAY_TO": "10:30"}


def _versions(fleet: str) -> list[str]:
    """The version label of each running handler container of ``fleet``."""
    ids = _handlers(fleet)
    if not ids:
        return []
    out = docker("inspect", "--format", f'{{{{index .Config.Labels "{LABEL_VERSION}"}}}}', *ids)
    return out.stdout.split()


@pytest.mark.usefixtures("image")
def test_readme_rollout_promotes_a_new_image_on_the_compose_stack(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    fleet, v2 = f"ro{tag}", f"tickscale:v2-{tag}"
    ctx = tmp_path / "v2"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {IMAGE}\nLABEL io.tickscale.test=v2\n")
    docker("build", "-q", "-t", v2, str(ctx))
    stack = _compose_stack(tmp_path, SCALER_NAME=fleet, **ROLLOUT_SETTINGS)
    ok = False
    try:
        services = stack.run("config", "--services").stdout.split()
        r = stack.run("up", "-d", *(s for s in services if s not in NOT_HERE | TOOLS), timeout=420)
        assert r.returncode == 0, r.stdout + r.stderr
        _wait("the open's fleet", lambda: len(_handlers(fleet)) == E2E_MAX_HANDLERS, 240)
        old = set(_versions(fleet))
        assert v2 not in old, old

        # The README's second and third commands, as written there.
        gate = stack.run("up", "-d", "docker-gate", shell_env={"TICKSCALE_ROLLOUT_IMAGES": v2})
        assert gate.returncode == 0, gate.stdout + gate.stderr
        t0 = time.monotonic()
        ro = stack.run("exec", "-T", "scaler", "tickscale", "rollout", "--image", v2, timeout=600)
        took = time.monotonic() - t0
        print(f"rollout took {took:.0f} s\n{ro.stdout[-3000:]}{ro.stderr[-2000:]}")
        assert ro.returncode == 0, ro.stdout[-3000:] + ro.stderr[-3000:]
        assert "promoted" in ro.stdout, ro.stdout[-3000:]
        # Every handler the scaler runs now is the new version, the fleet as big as before.
        running = _versions(fleet)
        assert running and set(running) == {v2}, running

        replay = stack.cid("replay")
        _wait("the replay to finish", lambda: _state(replay)["Status"] == "exited", 420)
        assert _state(replay)["ExitCode"] == 0, stack.logs(fleet)
        _assert_compose_ledger(stack, replay, tmp_path)
        ok = True
    finally:
        if not ok:
            print(stack.logs(fleet))
        stack.run("down", "-v", "--remove-orphans", timeout=240)
        left = _handlers(fleet, all_states=True)
        if left:
            docker("rm", "-f", *left, check=False)
        docker("image", "rm", "-f", v2, check=False)
