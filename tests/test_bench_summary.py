"""The bench summary: result files in, one table between the markers of a document out."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from bench import summary
from bench.results import write_result


def _doc(tmp_path: Path) -> Path:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nintro\n\n{summary.START}\nold table\n{summary.END}\n\nrest\n")
    return doc


def test_summary_shows_the_latest_run_of_each_bench(tmp_path: Path) -> None:
    results = tmp_path / "results"
    day1 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
    day2 = dt.datetime(2026, 12, 3, 9, 0, tzinfo=dt.UTC)
    old = write_result("replay", {"publisher_records_per_s": 100}, {"rate_vs_baseline": 1.5},
                       root=results, now=day1)  # fmt: skip
    new = write_result("replay", {"publisher_records_per_s": 163_000}, {"rate_vs_baseline": 3.2},
                       {"params": {"rounds": 3}}, root=results, now=day2)  # fmt: skip
    write_result("scaler", {"live_up_s_tickscale": 6.2}, {"backtest_handler_seconds": 0.64},
                 root=results, now=day1)  # fmt: skip
    assert old.name == "2026-12-01-replay.json" and new.name == "2026-12-03-replay.json"
    written = json.loads(new.read_text())
    assert written["date"] == "2026-12-03T09:00:00Z"
    assert written["host"]["cpus"] >= 1 and written["host"]["busy"]
    assert written["params"] == {"rounds": 3}

    doc = _doc(tmp_path)
    assert summary.main(["--results", str(results), "--doc", str(doc)]) == 0
    text = doc.read_text()
    table = text[text.index(summary.START) : text.index(summary.END)]
    assert "old table" not in text and text.endswith(f"{summary.END}\n\nrest\n")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 3  # header, replay, scaler
    assert rows[1].startswith("| replay | [2026-12-03T09:00:00Z](../bench/results/2026-12-03")
    assert "publisher_records_per_s: 163,000" in rows[1] and "rate_vs_baseline: 3.2" in rows[1]
    assert "2026-12-01-replay" not in table  # the older run of the same bench is left out
    assert rows[2].startswith("| scaler | [2026-12-01")
    assert "backtest_handler_seconds: 0.64" in rows[2]


def test_summary_without_results_says_so(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    assert summary.main(["--results", str(tmp_path / "none"), "--doc", str(doc)]) == 0
    assert "No bench run has written a result" in doc.read_text()


def test_a_broken_result_file_is_one_error_line(tmp_path: Path, capsys: object) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "2026-12-01-replay.json").write_text("{not json")
    doc = _doc(tmp_path)
    assert summary.main(["--results", str(results), "--doc", str(doc)]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert err.startswith("error: ") and "2026-12-01-replay.json" in err and err.count("\n") == 1
    assert "old table" in doc.read_text()  # left as it was
