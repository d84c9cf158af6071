"""``tickscale loadtest compare A.json B.json``: two runs side by side."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from tickscale.loadtest.results import COMPARE_FIELDS


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "pass" if v else "FAIL"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, A, B, B vs A) for every compared field either run has."""
    out = []
    for key, label, lower_better in COMPARE_FIELDS:
        va, vb = a.get(key), b.get(key)
        if va is None and vb is None:
            continue
        change = ""
        numeric = (int, float)
        if (
            isinstance(va, numeric)
            and isinstance(vb, numeric)
            and not isinstance(va, bool)
            and not isinstance(vb, bool)
        ):
            if va != 0:
                ratio = vb / va
                better = (ratio < 1) if lower_better else None
                mark = "" if better is None or ratio == 1 else (" better" if better else " worse")
                change = f"x{ratio:.2f}{mark}"
            elif vb != 0:
                change = "from 0"
        elif va != vb:
            change = "differs"
        out.append((label, _fmt(va), _fmt(vb), change))
    return out


def print_comparison(
    a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str, console: Console
) -> None:
    t = Table(title="load test comparison")
    t.add_column("metric")
    t.add_column(f"A: {name_a}", justify="right")
    t.add_column(f"B: {name_b}", justify="right")
    t.add_column("B vs A", justify="right")
    for r in rows(a, b):
        t.add_row(*r)
    console.print(t)
