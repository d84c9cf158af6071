"""The benchmark summary: the latest run of each bench, as one table in ``docs/benchmarks.md``.

``python -m bench.summary`` reads every ``bench/results/*.json`` (written by
``bench.results.write_result``), keeps the newest run per bench and replaces what lies between
the summary markers of ``docs/benchmarks.md``. Run it after a bench run; the table is generated,
never edited by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.results import RESULTS_DIR

START = "<!-- bench-summary:start -->"
END = "<!-- bench-summary:end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


class SummaryError(Exception):
    """Input to fix: a result file or the document; the message names it."""


def load_results(root: Path) -> list[dict[str, Any]]:
    """Every result file under ``root``, each with the file it came from."""
    runs = []
    for path in sorted(root.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SummaryError(f"{path}: not a readable JSON result ({e}); fix or remove it") from e
        missing = [k for k in ("bench", "date", "figures", "ratios") if k not in doc]
        if not isinstance(doc, dict) or missing:
            raise SummaryError(f"{path}: a result needs the keys {missing}; fix or remove it")
        doc["_file"] = path.name
        runs.append(doc)
    return runs


def latest_per_bench(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest run of each bench (ISO 8601 UTC dates sort as text), by bench name."""
    newest: dict[str, dict[str, Any]] = {}
    for r in runs:
        b = str(r["bench"])
        if b not in newest or str(r["date"]) > str(newest[b]["date"]):
            newest[b] = r
    return [newest[b] for b in sorted(newest)]


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, dict):  # a variant's own figures, one line
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v).replace("|", "/")


def _pairs(d: dict[str, Any]) -> str:
    return "<br>".join(f"{k}: {_fmt(v)}" for k, v in d.items()) or "-"


def render_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per bench with its latest run's date, host, figures and ratios."""
    latest = latest_per_bench(runs)
    if not latest:
        return "No bench run has written a result under `bench/results/` yet."
    lines = [
        "| bench | run (UTC) | host | headline figures | ratios against the baseline |",
        "|---|---|---|---|---|",
    ]
    for r in latest:
        host = r.get("host") or {}
        where = f"{host.get('cpus', '?')} CPUs, {host.get('busy') or 'load not recorded'}"
        lines.append(
            f"| {r['bench']} | [{r['date']}](../bench/results/{r['_file']}) | {_fmt(where)} "
            f"| {_pairs(r['figures'])} | {_pairs(r['ratios'])} |"
        )
    return "\n".join(lines)


def update_doc(doc: Path, table: str) -> None:
    """Replace the text between the markers of ``doc`` with ``table``."""
    try:
        text = doc.read_text()
    except OSError as e:
        raise SummaryError(f"{doc}: cannot read it ({e.strerror})") from e
    a, b = text.find(START), text.find(END)
    if a < 0 or b < a:
        raise SummaryError(f"{doc}: needs the lines {START} and {END}, in that order")
    doc.write_text(text[: a + len(START)] + "\n" + table + "\n" + text[b:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS_DIR, help="the result files' folder")
    ap.add_argument("--doc", type=Path, default=DOC, help="the document holding the markers")
    args = ap.parse_args(argv)
    try:
        runs = load_results(args.results)
        update_doc(args.doc, render_table(runs))
    except SummaryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.doc}: summary of {len(latest_per_bench(runs))} bench(es) from {len(runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
