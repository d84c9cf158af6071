"""One dated JSON file per bench run, under ``bench/results/``.

``bench/results/YYYY-MM-DD-<bench>.json`` holds the run's date, the machine it ran on and how
busy that machine was, its headline figures and its ratios against the baseline measured in the
same run. ``python -m bench.summary`` turns the latest file per bench into the table in
``docs/benchmarks.md``; runs are never logged by hand.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def host_info() -> dict[str, Any]:
    """CPU count and the load averages at the end of the run (the figures depend on both)."""
    try:
        one, five, fifteen = os.getloadavg()
        busy = f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"
    except OSError:
        busy = "load average unknown"
    return {"cpus": os.cpu_count() or 0, "busy": busy}


def write_result(
    bench: str,
    figures: dict[str, Any],
    ratios: dict[str, Any],
    extra: dict[str, Any] | None = None,
    *,
    root: Path = RESULTS_DIR,
    now: dt.datetime | None = None,
) -> Path:
    """Write ``<root>/YYYY-MM-DD-<bench>.json`` and return its path.

    A second run of the same bench on the same day replaces the first: the summary shows
    the latest run per bench, and git keeps whatever was committed.
    """
    when = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).replace(microsecond=0)
    doc: dict[str, Any] = {
        "bench": bench,
        "date": when.isoformat().replace("+00:00", "Z"),
        "host": host_info(),
        "figures": figures,
        "ratios": ratios,
    }
    for k, v in (extra or {}).items():
        if k == "host" and isinstance(v, dict):
            doc["host"].update(v)  # e.g. what else the bench saw running
        elif k not in doc:
            doc[k] = v
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{when.date().isoformat()}-{bench}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path
