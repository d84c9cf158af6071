"""The README's chart tool: a run's samples.csv and results.json in, one stacked chart out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tickscale.loadtest import chart

# The axis then reads 09:46 to 09:54.

WALL0, MARKET0 = 1_796_446_700.0, 1_732_545_900.0  # 2024-11-25 09:45 in New York


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True)
    with (run / "samples.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["market", "wall", "lag_s", "lag_msgs", "ingest_rate", "process_rate", "members",
                    "group_state", "handlers", "lat_p50", "lat_p99", "replay_msgs"])  # fmt: skip
        for i in range(30):
            handlers = 1 if i < 15 else 3
            w.writerow([MARKET0 + 20 * i, WALL0 + i, 0.5, 10, 1000, 990 if i else "",
                        handlers, "Stable", handlers, 0.01, 0.05, 1000 * i])  # fmt: skip
    events = [{"time": WALL0 + 15, "from": 1, "to": 3}, {"time": WALL0 + 29, "from": 3, "to": 2}]
    result = {"run_id": "lt-test", "scenario": "open", "policy": "tickscale",
              "lag_target_s": 5.0, "scale_events": events}  # fmt: skip
    (run / "results.json").write_text(json.dumps(result))
    return run


def test_chart_draws_a_run_as_svg(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "docs" / "day.svg"
    assert chart.main([str(_run(tmp_path)), "-o", str(out)]) == 0
    svg = out.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for text in ("lt-test", "into md.raw", "target 5 s", "group members", "09:50"):
        assert text in svg, text
    # The first sample (no replayed message yet) is kept as the start; none is dropped after it.
    rows, _ = chart.read_run(_run(tmp_path / "again"))
    assert len(rows) == 30 and rows[1]["process_rate"] == 990


def test_a_folder_without_a_run_is_one_error_line(tmp_path: Path, capsys: object) -> None:
    assert chart.main([str(tmp_path), "-o", str(tmp_path / "x.svg")]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert err.startswith("error: ") and str(tmp_path) in err and err.count("\n") == 1
    assert not (tmp_path / "x.svg").exists()
