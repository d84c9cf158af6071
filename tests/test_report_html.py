"""The load test's HTML report: every value is text, the charts are embedded."""

from __future__ import annotations

import base64
import datetime as dt

from ingest.normalize import EXCHANGE_TZ
from tickscale.loadtest.report import charts
from tickscale.loadtest.report_html import render_html
from tickscale.loadtest.sampler import ReplayClock, Sample


def test_values_are_escaped_and_charts_embedded() -> None:
    r = {
        "run_id": "r1", "ok": False, "scenario": "<script>x</script>", "ledger_ok": True,
        "ticks_read": 1200, "ticks_expected": 1200, "latency_p99_s": 0.25,
        "slo": [{"name": "latency p99", "threshold": 5.0, "ok": True}],
        "chaos": [{"kind": "kill-handler", "at_s": 3.0, "ok": True, "detail": "a & b"}],
        "scale_events": [{"offset_s": 1.5, "from": 1, "to": 3, "signal": "rate"}],
    }  # fmt: skip
    page = render_html(r, {"lag": b"\x89PNG"})
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "a &amp; b" in page
    assert 'class="fail">FAIL' in page  # the run's verdict
    assert "1,200 / 1,200" in page
    assert "&le; 5 s" in page  # the SLO's limit beside its figure
    png = base64.b64encode(b"\x89PNG").decode()
    assert f"data:image/png;base64,{png}" in page
    assert "<h2>Lag</h2>" in page and "<h2>Rate</h2>" not in page


def test_without_charts_the_report_says_why() -> None:
    page = render_html({"run_id": "r2", "charts_note": "no charts: matplotlib"}, {})
    assert "no charts: matplotlib" in page


def test_the_day_is_drawn_as_four_charts() -> None:
    clock = ReplayClock()
    open_ = dt.datetime(2026, 12, 4, 9, 25, tzinfo=EXCHANGE_TZ).timestamp()
    for i in range(61):  # a minute of wall time is an hour of the day at 60x
        clock.add(1000.0 + i, open_ + 60 * i)
    samples = [
        Sample(wall=1000.0 + i, lag_s=0.1 * i, ingest_rate=100.0 + i, process_rate=90.0 + i,
               members=2, handlers=2 + i // 30, lat_p50=0.01, lat_p99=0.05)
        for i in range(61)
    ]  # fmt: skip
    events = [{"time": 1030.0, "from": 2, "to": 3}]
    chaos = [{"kind": "kill-handler", "wall": 1040.0}]
    pngs = charts(samples, clock, events, chaos, 5.0, burst=(34_200, 34_500))
    assert set(pngs) == {"rate", "lag", "handlers", "latency"}
    assert all(p.startswith(b"\x89PNG") and len(p) > 5_000 for p in pngs.values())
    assert charts([], clock, [], [], 5.0) == {}  # nothing sampled: no charts
