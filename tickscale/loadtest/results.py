"""The JSON a run writes (``--json`` and ``results.json`` in the run's directory).

Top-level fields are flat so scripts and ``compare`` read them without knowing the nesting:

``ok``, ``ledger_ok``, ``slo_ok``, ``missing``, ``duplicated``, ``reordered``,
``checksum_mismatch``, ``ticks_read``, ``ticks_expected``, ``deadletters``,
``deadletters_expected``, ``latency_p50_s``, ``latency_p99_s``, ``latency_max_s``,
``lag_p99_s``, ``lag_max_s``, ``lag_above_target_s``, ``recovery_s``, ``handler_seconds``
(live handler processes), ``member_seconds`` (the group's members), ``peak_handlers``,
``fixed_peak_handler_seconds``, ``handler_seconds_ratio``, ``duration_s``, ...

plus ``slo`` (each check), ``chaos`` (each drill), ``scale_events`` (the audit stream),
``recoveries``, ``replay`` and ``ledger`` (details). Values that were not measured are null;
a latency maximum above the histogram's last finite bucket is null with
``latency_max_note`` saying so (JSON has no infinity).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson

SCHEMA = 1

# (field, label, lower is better) for the side-by-side comparison.
COMPARE_FIELDS: list[tuple[str, str, bool]] = [
    ("scenario", "scenario", False),
    ("policy", "policy", False),
    ("speed", "speed", False),
    ("ok", "verdict (ledger and SLOs)", False),
    ("ledger_ok", "ledger", False),
    ("slo_ok", "SLOs", False),
    ("missing", "ticks missing", True),
    ("duplicated", "ticks duplicated", True),
    ("reordered", "ticks reordered", True),
    ("checksum_mismatch", "checksum mismatches", True),
    ("ticks_read", "ticks read", False),
    ("replay_records", "raw records", False),
    ("peak_rate", "peak rate (msg/s)", False),
    ("latency_p50_s", "latency p50 (s)", True),
    ("latency_p99_s", "latency p99 (s)", True),
    ("latency_max_s", "latency max, bucket bound (s)", True),
    ("lag_p99_s", "lag p99 (s)", True),
    ("lag_max_s", "lag max (s)", True),
    ("lag_above_target_s", "lag above target (s)", True),
    ("recovery_s", "recovery (s)", True),
    ("duration_s", "duration (s)", True),
    ("handler_seconds", "handler-seconds", True),
    ("member_seconds", "member-seconds (group members)", True),
    ("peak_handlers", "peak handlers", True),
    ("fixed_peak_handler_seconds", "fixed peak-sized fleet (handler-s)", True),
    ("handler_seconds_ratio", "handler-seconds / fixed fleet", True),
    ("scale_event_count", "scale events", False),
]


def jsonable(obj: Any) -> Any:
    """Non-finite floats to None, recursively (JSON has no infinity or NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(jsonable(result), option=orjson.OPT_INDENT_2))


def load(path: Path) -> dict[str, Any]:
    data = orjson.loads(path.read_bytes())
    if not isinstance(data, dict) or "ledger_ok" not in data:
        raise ValueError(f"{path} is not a load-test result (no ledger_ok field)")
    return data
