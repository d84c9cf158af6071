"""One picture of a load-test run: rate, lag and handlers over the replayed market time.

``python -m tickscale.loadtest.chart RUN_DIR -o docs/day.svg`` reads what a run wrote to its
output folder (``samples.csv``: one row a second with the replayed market time; ``results.json``:
the scale events and the lag target) and draws the three panels stacked on one time axis, so
the README can show a real run. The HTML report draws the same series one chart each.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
from bisect import bisect_left
from pathlib import Path
from typing import Any

from ingest.normalize import EXCHANGE_TZ


class ChartError(Exception):
    """Input to fix; the message names it."""


def _num(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return float("nan")  # an empty cell: not measured in that second


def read_run(run: Path) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """The run's samples that have a market time, and its results."""
    try:
        with (run / "samples.csv").open(newline="") as f:
            rows = [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]
        result = json.loads((run / "results.json").read_text())
    except (OSError, ValueError) as e:
        raise ChartError(f"{run}: not a finished load-test run's folder ({e})") from e
    rows = [r for r in rows if r.get("market") == r.get("market")]  # drop NaN market times
    # Before its first message the replay has no clock: those samples' market times are
    # extrapolated backwards, so the chart starts at the last sample before the first message.
    first = next((i for i, r in enumerate(rows) if r.get("replay_msgs", 0) > 0), 0)
    rows = rows[max(0, first - 1) :]
    if not rows:
        raise ChartError(f"{run}/samples.csv: no sample has a replayed market time")
    return rows, result


def _hours(market: float) -> float:
    t = dt.datetime.fromtimestamp(market, tz=EXCHANGE_TZ)
    return t.hour + t.minute / 60 + (t.second + t.microsecond / 1e6) / 3600


def _at(rows: list[dict[str, float]], wall: float) -> float | None:
    """Market hours of the sample nearest a wall time (scale events are stamped in wall time)."""
    walls = [r["wall"] for r in rows]
    i = bisect_left(walls, wall)
    if i >= len(rows) or (i == 0 and wall < walls[0] - 2):
        return None
    return _hours(rows[i]["market"])


def draw(rows: list[dict[str, float]], result: dict[str, Any], out: Path) -> None:
    """Three panels (rate, lag, handlers) sharing the replayed market time; SVG or PNG by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: a far smaller SVG
    xs = [_hours(r["market"]) for r in rows]
    fig, (rate, lag, fleet) = plt.subplots(3, 1, sharex=True, figsize=(9, 6), dpi=100)
    rate.plot(xs, [r["ingest_rate"] for r in rows], lw=1, label="into md.raw")
    rate.plot(xs, [r["process_rate"] for r in rows], lw=1, label="processed (committed)")
    rate.set_ylabel("messages/s")
    lag.plot(xs, [r["lag_s"] for r in rows], lw=1.2, color="#7b2cbf", label="lag")
    target = float(result.get("lag_target_s") or 0)
    if target:
        lag.axhline(target, color="#d62828", ls=":", lw=1, label=f"target {target:g} s")
    lag.set_ylabel("lag (s)")
    fleet.step(xs, [r["handlers"] for r in rows], where="post", lw=1.5, label="handlers")
    fleet.step(xs, [r["members"] for r in rows], where="post", lw=1, ls="--", label="group members")
    fleet.set_ylim(bottom=0)
    fleet.set_ylabel("handlers")
    for e in result.get("scale_events") or []:
        x = _at(rows, float(e["time"]))
        if x is not None:
            up = int(e["to"]) > int(e["from"])
            fleet.axvline(x, color="#2a9d4b" if up else "#e08a1e", lw=1, alpha=0.8)
    for ax in (rate, lag, fleet):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fleet.xaxis.set_major_formatter(
        FuncFormatter(lambda v, _: f"{int(v):02d}:{round(v * 60) % 60:02d}")
    )
    fleet.set_xlabel("replayed market time (exchange time); scale events: green up, orange down")
    rate.set_title(
        f"load test {result.get('run_id', '?')}: scenario {result.get('scenario', '?')}, "
        f"policy {result.get('policy', '?')}",
        fontsize=10, loc="left",
    )  # fmt: skip
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Date": None} if out.suffix == ".svg" else None)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a load test's output folder (--out)")
    ap.add_argument("-o", "--output", type=Path, required=True, help="image to write (.svg/.png)")
    args = ap.parse_args(argv)
    try:
        rows, result = read_run(args.run)
        draw(rows, result, args.output)
    except ChartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(
            f"error: {e}; install the plot extra (pip install 'tickscale[plot]')", file=sys.stderr
        )
        return 2
    print(f"{args.output}: {len(rows)} samples of run {result.get('run_id', '?')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
