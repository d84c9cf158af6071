"""`tickscale up`, the main job, end to end: its own broker and Redis, the scaler and its
handlers, a replayed window, the ledger."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tickscale.localstack.net import free_port


def test_up_runs_a_replayed_open_with_the_scaler_and_verifies(tmp_path: Path) -> None:
    state = tmp_path / "up"
    r = subprocess.run(
        [sys.executable, "-m", "tickscale", "up", "--symbols", "10", "--from", "09:27",
         "--to", "09:34", "--speed", "30", "--handlers", "1", "--max-handlers", "2",
         "--kafka-port", str(free_port()), "--redis-port", str(free_port()),
         "--metrics-port", str(free_port()), "--scaler-port", str(free_port()),
         "--state-dir", str(state)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out = r.stdout + r.stderr
    scaler_log = (state / "logs" / "scaler.log").read_text(errors="replace")
    assert r.returncode == 0, out[-3000:] + scaler_log[-3000:]
    assert "missing=0 duplicated=0 reordered=0 checksum_mismatch=0" in out
    # The scaler ran the handlers, and the replayed open (the session floor, from the
    # replay clock) or its load took the fleet to the maximum.
    ups = [ln for ln in scaler_log.splitlines() if "scaler.audit: scale up" in ln]
    assert any("->2 " in ln for ln in ups), scaler_log[-3000:]
    assert list((state / "scaler" / "logs").glob("handler-*.log"))
