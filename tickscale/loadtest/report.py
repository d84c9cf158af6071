"""The run's report: PNG charts over the replayed day and one self-contained HTML file.

Charts share a market-time axis (the replayed day's clock, exchange time) with the trading
sessions shaded, scale events from the scaler's audit stream marked (green up, orange down)
and chaos drills marked in red. After the last message the axis runs on at the replay's
average speed, so the drain stays visible. The PNGs are written next to the report and also
embedded in it (base64), so the HTML file alone is the whole report.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import sessions
from ingest.normalize import EXCHANGE_TZ
from tickscale.loadtest.report_html import render_html
from tickscale.loadtest.sampler import ReplayClock, Sample

SESSION_SPANS: list[tuple[str, str]] = [
    ("pre-market", "#eef2f7"),
    ("open", "#fde9c9"),
    ("midday", "#f4f4f4"),
    ("close", "#fde9c9"),
    ("after-hours", "#eef2f7"),
]


def _session_bounds(close_s: int) -> list[tuple[str, str, float, float]]:
    edges = [
        sessions.PRE_MARKET_START,
        sessions.OPEN,
        sessions.OPEN + 1800,
        close_s - 1800,
        close_s,
        sessions.AFTER_HOURS_END,
    ]
    return [
        (name, color, edges[i] / 3600, edges[i + 1] / 3600)
        for i, (name, color) in enumerate(SESSION_SPANS)
    ]


def market_midnight(market_ts: float) -> float:
    d = dt.datetime.fromtimestamp(market_ts, tz=EXCHANGE_TZ).date()
    return dt.datetime.combine(d, dt.time(0), tzinfo=EXCHANGE_TZ).timestamp()


class _Day:
    """The charts' shared frame: a market-time axis in hours with the sessions shaded, the
    scale events and chaos drills marked."""

    def __init__(self, pts: list[tuple[float, Sample]], clock: ReplayClock, marks: _Marks) -> None:
        self.pts, self.clock, self.marks = pts, clock, marks
        self.midnight = market_midnight(pts[0][0])
        self.xs = [self.hours(m) for m, _ in pts]
        self.lo, self.hi = min(self.xs), max(self.xs)
        self.pad = max((self.hi - self.lo) * 0.01, 1 / 3600)

    def hours(self, market: float) -> float:
        return (market - self.midnight) / 3600

    def x_of(self, wall: float) -> float | None:
        m = self.clock.market_at(wall)
        return None if m is None else self.hours(m)

    def series(
        self, get: Callable[[Sample], float | int | None]
    ) -> tuple[list[float], list[float]]:
        ys = [get(s) for _, s in self.pts]
        return self.xs, [float("nan") if v is None else float(v) for v in ys]

    def _sessions(self, ax: Any) -> None:
        lo, hi, pad = self.lo, self.hi, self.pad
        for name, color, a, b in _session_bounds(self.marks.close_s):
            if b >= lo - pad and a <= hi + pad:
                ax.axvspan(max(a, lo - pad), min(b, hi + pad), color=color, zorder=0)
                mid = (max(a, lo) + min(b, hi)) / 2
                if lo <= mid <= hi:
                    ax.text(mid, 0.02, name, transform=ax.get_xaxis_transform(), ha="center",
                            va="bottom", fontsize=7, color="#667")  # fmt: skip

    def _events(self, ax: Any) -> None:
        burst = self.marks.burst
        if burst is not None:
            ax.axvspan(
                burst[0] / 3600, burst[1] / 3600, facecolor="none", hatch="//",
                edgecolor="#d62828", alpha=0.35, lw=0, zorder=1, label="flash burst",
            )  # fmt: skip
        for e in self.marks.scale_events:
            x = self.x_of(float(e["time"]))
            if x is not None:
                up = int(e["to"]) > int(e["from"])
                ax.axvline(x, color="#2a9d4b" if up else "#e08a1e", lw=1, alpha=0.8)
        for c in self.marks.chaos:
            x = self.x_of(float(c.get("wall") or 0))
            if x is None or not c.get("wall"):
                continue
            ax.axvline(x, color="#d62828", lw=1.3, ls="--")
            ax.text(x, 0.97, c["kind"], transform=ax.get_xaxis_transform(), rotation=90,
                    ha="right", va="top", fontsize=7, color="#d62828")  # fmt: skip

    def render(self, draw: Callable[[Any], None], ylabel: str, title: str) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter

        fig, ax = plt.subplots(figsize=(11, 3.2), dpi=100)
        draw(ax)
        self._sessions(ax)
        self._events(ax)
        ax.set_xlim(self.lo - self.pad, self.hi + self.pad)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(
            FuncFormatter(lambda v, _: f"{int(v):02d}:{round(v * 60) % 60:02d}")
        )
        ax.set_xlabel("replayed market time (exchange time)")
        ax.set_title(title, fontsize=10, loc="left")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return buf.getvalue()


@dataclass(frozen=True)
class _Marks:
    scale_events: Sequence[dict[str, Any]]
    chaos: Sequence[dict[str, Any]]
    close_s: int
    burst: tuple[int, int] | None


def charts(
    samples: Sequence[Sample],
    clock: ReplayClock,
    scale_events: Sequence[dict[str, Any]],
    chaos: Sequence[dict[str, Any]],
    lag_target_s: float,
    close_s: int = sessions.CLOSE,
    burst: tuple[int, int] | None = None,
) -> dict[str, bytes]:
    """PNG bytes per chart name (rate, lag, handlers, latency); empty without data."""
    import matplotlib  # noqa: F401 (ImportError here: no plot extra, no charts)

    pts = [(m, s) for m, s in ((clock.market_at(s.wall), s) for s in samples) if m is not None]
    if not pts:
        return {}
    day = _Day(pts, clock, _Marks(scale_events, chaos, close_s, burst))
    series = day.series

    def rate(ax: Any) -> None:
        ax.plot(*series(lambda s: s.ingest_rate), label="into md.raw", lw=1)
        ax.plot(*series(lambda s: s.process_rate), label="processed (committed)", lw=1)

    def lag(ax: Any) -> None:
        ax.plot(*series(lambda s: s.lag_s), label="lag (s)", color="#7b2cbf", lw=1.2)
        ax.axhline(lag_target_s, color="#d62828", ls=":", lw=1, label=f"target {lag_target_s:g} s")

    def handlers(ax: Any) -> None:
        ax.step(*series(lambda s: s.handlers), where="post", label="handler processes", lw=1.5)
        ax.step(*series(lambda s: s.members), where="post", label="group members", lw=1, ls="--")
        ax.set_ylim(bottom=0)

    def latency(ax: Any) -> None:
        ax.plot(*series(lambda s: s.lat_p50), label="p50", lw=1)
        ax.plot(*series(lambda s: s.lat_p99), label="p99", lw=1)
        ax.set_yscale("log")

    return {
        "rate": day.render(rate, "messages/s", "Message rate"),
        "lag": day.render(
            lag, "seconds", "Lag of the handler group (age of the oldest unprocessed)"
        ),
        "handlers": day.render(
            handlers, "handlers", "Handlers (scale events: green up, orange down)"
        ),
        "latency": day.render(
            latency, "seconds", "End-to-end latency percentiles (handler histograms, 5 s windows)"
        ),
    }


def write_report(
    result: dict[str, Any],
    samples: Sequence[Sample],
    clock: ReplayClock,
    out_dir: Path,
    lag_target_s: float,
    close_s: int = sessions.CLOSE,
    burst: tuple[int, int] | None = None,
) -> Path:
    """Charts as PNG files in ``out_dir`` and ``report.html`` embedding them; the report path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        pngs = charts(samples, clock, result.get("scale_events", []), result.get("chaos", []),
                      lag_target_s, close_s, burst)  # fmt: skip
    except ImportError as e:
        pngs = {}
        result["charts_note"] = f"no charts: {e} (install the plot extra: matplotlib)"
    paths = []
    for name, png in pngs.items():
        p = out_dir / f"{name}.png"
        p.write_bytes(png)
        paths.append(str(p))
    result["charts"] = paths
    report = out_dir / "report.html"
    report.write_text(render_html(result, pngs))
    return report
