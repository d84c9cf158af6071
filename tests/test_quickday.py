"""``tickscale up`` without options: the compressed day a newcomer runs first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_up_replays_a_compressed_day_that_scales_and_verifies(tmp_path: Path) -> None:
    # The README's command as a newcomer types it: no options, output under the
    # current directory.
    r = subprocess.run(
        [sys.executable, "-m", "tickscale", "up"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    (out,) = (tmp_path / ".local/loadtest").iterdir()
    assert "missing=0 duplicated=0 reordered=0 checksum_mismatch=0" in text
    assert (out / "report.html").is_file()
    res = json.loads((out / "results.json").read_text())
    assert res["scenario"] == "full-day" and res["ledger_ok"]
    # The point of the first run: the fleet grows for the day and the scaler says why.
    ups = [e for e in res["scale_events"] if e["action"] == "up" and e["to"] > 1]
    assert ups, res["scale_events"]


def test_a_full_day_option_without_full_day_is_one_line_and_exit_2() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tickscale", "up", "--from", "09:30"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --from: applies to the longer day only: add --full-day"
    assert "Traceback" not in r.stdout + r.stderr


def test_a_holiday_is_refused_before_anything_starts() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tickscale", "up", "--date", "2026-12-25"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--date" in r.stderr and "Traceback" not in r.stdout + r.stderr
