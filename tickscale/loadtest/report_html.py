"""The load test's report as one self-contained HTML page (a Jinja2 template, autoescaped:
every value from the run is text, never markup)."""

from __future__ import annotations

import base64
from typing import Any

from jinja2 import Environment

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1180px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f0f0f0;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1b7a3a;font-weight:600}.fail{color:#c1121f;font-weight:600}
img{max-width:100%;border:1px solid #ddd;margin:6px 0}code{background:#f4f4f4;padding:1px 4px}
.small{font-size:12px;color:#555}
"""

# (label, result key, SLO name) of the summary table's rows, in order.
_ROWS: list[tuple[str, str, str | None]] = [
    ("raw records replayed", "replay_records", None),
    ("peak rate into md.raw (msg/s)", "peak_rate", None),
    ("latency p50 (s)", "latency_p50_s", "latency p50"),
    ("latency p99 (s)", "latency_p99_s", "latency p99"),
    ("latency max, bucket upper bound (s)", "latency_max_s", "latency max"),
    ("lag p99 (s)", "lag_p99_s", "lag p99"),
    ("lag max (s)", "lag_max_s", "lag max"),
    ("recovery (s)", "recovery_s", "recovery"),
    ("duration, first message to drained (s)", "duration_s", None),
    ("handler-seconds used (live handler processes)", "handler_seconds", None),
    ("member-seconds (the group's members, from the broker)", "member_seconds", None),
    ("peak handlers", "peak_handlers", None),
    ("fixed fleet sized for the peak (peak x duration)", "fixed_peak_handler_seconds", None),
    ("handler-seconds / fixed fleet", "handler_seconds_ratio", None),
]
_CHARTS = [("rate", "Rate"), ("lag", "Lag"), ("handlers", "Handlers"), ("latency", "Latency")]

_TEMPLATE = """<!doctype html><html><head><meta charset='utf-8'>
<title>tickscale load test {{ r.run_id }}</title><style>{{ css }}</style></head><body>
{% macro verdict(ok) %}{% if ok %}<span class="pass">PASS</span>{% else %}<span class="fail">FAIL</span>{% endif %}{% endmacro %}
{% macro row(label, value, c=None) %}<tr><td>{{ label }}</td><td class='n'>{{ value }}</td><td>{% if c %}&le; {{ '%g' % c.threshold }} s{% endif %}</td><td>{% if c %}{{ verdict(c.ok) }}{% endif %}</td></tr>{% endmacro %}
<h1>Load test {{ r.run_id }}: {{ verdict(r.ok) }}</h1>
<p>scenario <b>{{ r.scenario }}</b>, policy <b>{{ r.policy }}</b>, target {{ r.target }}, {{ r.source }} {{ r.symbols|v }} symbols, seed {{ r.seed|v }}, date {{ r.date }}, window {{ r.window }}, speed {{ r.speed }}, {{ r.partitions|v }} partitions; started {{ r.started_at }}</p>
<p><code>{{ r.ledger_line }}</code></p>
<h2>Summary</h2><table><tr><th>metric</th><th>value</th><th>SLO</th><th></th></tr>
{{ row("ledger", "pass" if r.ledger_ok else "FAIL") }}
{{ row("ticks read / expected", (r.ticks_read|v) ~ " / " ~ (r.ticks_expected|v)) }}
{{ row("missing / duplicated / reordered", r.missing ~ " / " ~ r.duplicated ~ " / " ~ r.reordered) }}
{{ row("checksum mismatches", r.checksum_mismatch|v) }}
{{ row("dead letters / expected", (r.deadletters|v) ~ " / " ~ (r.deadletters_expected|v)) }}
{% for label, key, slo_name in rows %}{{ row(label, r.get(key)|v, slo.get(slo_name)) }}
{% endfor %}</table>
{% if r.latency_max_note %}<p class='small'>{{ r.latency_max_note }}</p>{% endif %}
{% for name, title in charts if name in pngs %}<h2>{{ title }}</h2><img alt='{{ name }}' src='data:image/png;base64,{{ pngs[name] }}'>
{% else %}<p class='small'>{{ r.get("charts_note", "no charts") }}</p>
{% endfor %}
<h2>Chaos</h2>
{% if r.chaos %}<table><tr><th>drill</th><th>at (s)</th><th>ok</th><th>detail</th></tr>
{% for c in r.chaos %}<tr><td>{{ c.kind }}</td><td class='n'>{{ '%g' % c.at_s }}</td><td>{{ verdict(c.ok) }}</td><td>{{ c.detail }}</td></tr>
{% endfor %}</table>{% else %}<p>none</p>{% endif %}
{% if r.recoveries %}<h2>Recovery</h2><table><tr><th>after</th><th>recovery (s)</th><th>peak lag after it (s)</th></tr>
{% for rc in r.recoveries %}<tr><td>{{ rc.label }}</td><td class='n'>{{ rc.recovery_s|v(1) }}</td><td class='n'>{{ rc.peak_lag_s|v(1) }}</td></tr>
{% endfor %}</table>{% endif %}
<h2>Scale events (scaler audit stream)</h2>
{% if r.scale_events %}<table><tr><th>+s</th><th>from</th><th>to</th><th>signal</th><th>explanation</th></tr>
{% for ev in r.scale_events %}<tr><td class='n'>{{ ev.get("offset_s")|v(1) }}</td><td class='n'>{{ ev["from"] }}</td><td class='n'>{{ ev["to"] }}</td><td>{{ ev.get("signal", "") }}</td><td class='small'>{{ ev.get("explanation", "") }}</td></tr>
{% endfor %}</table>{% else %}<p>none</p>{% endif %}
<h2>Replay</h2><p>{% for k, val in (r.replay or {}).items() %}{{ k }}={{ val|v }}{% if not loop.last %}, {% endif %}{% endfor %}</p>
<p class='small'>Latency: the handlers' <code>tickscale_handler_e2e_latency_seconds</code> histograms (raw record published to its ticks committed), scraped every second from every handler and merged; percentiles are interpolated within buckets and the maximum is the upper bound of the highest non-empty bucket. Lag: the scaler's own measure (age of the oldest unprocessed raw record), sampled every second from the broker.</p></body></html>
"""  # noqa: E501 (markup lines)


def _v(v: Any, digits: int = 3) -> str:
    """A number for a table cell: thousands separated, ``-`` for none."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


_ENV = Environment(autoescape=True, trim_blocks=True)
_ENV.filters["v"] = _v
_PAGE = _ENV.from_string(_TEMPLATE)


def render_html(r: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """The report page of result ``r`` with the charts ``pngs`` embedded."""
    slo = {c["name"]: c for c in r.get("slo", [])}
    b64 = {name: base64.b64encode(png).decode() for name, png in pngs.items()}
    return _PAGE.render(r=r, pngs=b64, slo=slo, rows=_ROWS, charts=_CHARTS, css=_CSS)
