"""The queries of the Grafana dashboards in ``grafana/dashboards``, runnable outside Grafana.

A renamed metric or a mistyped label leaves a panel empty without any error, so
the dashboards are checked the way Grafana uses them: every panel target (also
inside collapsed rows), every annotation and every template variable query is
extracted, Grafana's variables are rendered into plain PromQL, and a real
Prometheus is asked which of them return nothing.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "grafana" / "dashboards"

# What Grafana's built-in interval variables stand for when a query runs
# outside Grafana. 1m is $__rate_interval for scrape intervals up to 15 s.
BUILTINS: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
}

# Queries that have data only when an event happens, with the event: a run
# without it may find them empty (tests/test_rollout.py checks the rollout steps
# are exported). Each must still run without error.
EVENT_ONLY: dict[tuple[str, str], str] = {
    ("overview", 'annotation "Rollouts"'): "a handler rollout",
}

_MATCHER_VAR = re.compile(r'(=~|=)"(?:\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\])"')
# A leading digit is not a variable: "$1" is a label_replace() back-reference.
_BARE_VAR = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)|\[\[([A-Za-z_]\w*)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.+),\s*([A-Za-z_]\w*)\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((.+)\)\s*$", re.S)

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan", "atan2"}
)


@dataclass(frozen=True)
class Query:
    """One query a dashboard runs, as written and as checked.

    :param where: e.g. ``panel 12 "Lag (seconds)" B``, ``annotation "Scale events"``
    :param promql: ``expr`` with Grafana's variables rendered (see ``render``)
    :param instant: Grafana runs it as an instant query rather than over the time range
    """

    dashboard: str
    where: str
    expr: str
    promql: str
    instant: bool = False


@dataclass(frozen=True)
class Failure:
    """A query that returned no series with a value (``error`` is None) or failed."""

    query: Query
    error: str | None = None

    def __str__(self) -> str:
        what = self.error or "no data"
        return f"{self.query.dashboard}: {self.query.where}: {what}\n    {self.query.promql}"


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    """Every ``*.json`` dashboard in ``directory``, by file stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """All panels, rows included, with the panels of collapsed rows after their row."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from iter_panels(panel)


def all_values(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """What each template variable stands for when "All" is selected (a regex)."""
    out: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        out[var["name"]] = var.get("allValue") or ".*"
    return out


def render(expr: str, variables: Mapping[str, str]) -> str:
    """``expr`` with Grafana variables replaced: template variables by their "All" regex.

    A variable in a label matcher turns the matcher into a regex match
    (``="$v"`` becomes ``=~".*"``), as Grafana does for a multi-value selection.
    An unknown variable raises ValueError: it would be a typo in the dashboard.
    """

    def matcher(m: re.Match[str]) -> str:
        name = m.group(2) or m.group(3) or m.group(4)
        if name not in variables:
            return m.group(0)  # left for the bare pass, which names it
        return f'=~"{variables[name]}"'

    def bare(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in variables:
            return variables[name]
        if name in BUILTINS:
            return BUILTINS[name]
        raise ValueError(f"unknown variable ${name} in {expr!r}")

    return _BARE_VAR.sub(bare, _MATCHER_VAR.sub(matcher, expr))


def variable_promql(query: str) -> str:
    """A template variable's query as PromQL: ``label_values(sel, l)`` -> ``group by (l) (sel)``."""
    if m := _LABEL_VALUES.match(query):
        return f"group by ({m.group(2)}) ({m.group(1).strip()})"
    if m := _QUERY_RESULT.match(query):
        return m.group(1).strip()
    raise ValueError(f"unsupported variable query {query!r}")


def extract_queries(name: str, dashboard: Mapping[str, Any]) -> list[Query]:
    """Every query of one dashboard: panel targets, annotations, variable queries."""
    variables = all_values(dashboard)
    out: list[Query] = []
    for panel in iter_panels(dashboard):
        for t in panel.get("targets", []):
            if "expr" not in t:
                continue
            where = f'panel {panel.get("id")} "{panel.get("title", "")}" {t.get("refId", "")}'
            promql = render(t["expr"], variables)
            out.append(Query(name, where, t["expr"], promql, bool(t.get("instant"))))
    for ann in dashboard.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            where = f'annotation "{ann.get("name", "")}"'
            out.append(Query(name, where, ann["expr"], render(ann["expr"], variables)))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        text = q.get("query", "") if isinstance(q, Mapping) else str(q or "")
        where = f"variable ${var['name']}"
        # Grafana asks with the other variables at "All", the state the check uses.
        out.append(Query(name, where, text, render(variable_promql(text), variables)))
    return out


def metric_names(promql: str) -> set[str]:
    """Metric names a (rendered) PromQL expression selects.

    Strings, label matchers, ranges and grouping label lists are blanked first,
    so what remains that is neither a function call, a keyword nor a number is
    a metric name.
    """
    s = _STRINGS.sub('""', promql)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    return {m for m in _IDENT.findall(s) if m.lower() not in _KEYWORDS}


def _has_value(result: Mapping[str, Any]) -> bool:
    kind, data = result["resultType"], result["result"]
    if kind == "scalar":
        samples = [data]
    elif kind == "vector":
        samples = [r["value"] for r in data]
    elif kind == "matrix":
        samples = [v for r in data for v in r["values"]]
    else:
        return False
    # NaN is what histogram_quantile() and 0/0 give without observations:
    # Grafana draws nothing for it, so it is no data.
    return any(math.isfinite(float(v[1])) for v in samples)


def run_query(
    url: str,
    promql: str,
    *,
    start: float | None = None,
    end: float | None = None,
    step: float = 2.0,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """``data`` of an instant query at ``end`` (now if None), or a range query from ``start``."""
    params: dict[str, str] = {"query": promql}
    if start is None:
        path = "/api/v1/query"
        if end is not None:
            params["time"] = f"{end:.3f}"
    elif end is None:
        raise ValueError("a range query needs end")
    else:
        path = "/api/v1/query_range"
        params.update(start=f"{start:.3f}", end=f"{end:.3f}", step=str(step))
    req = f"{url.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as e:
        # Prometheus explains a bad query in the JSON body of its 400/422.
        try:
            body = json.load(e)
        except ValueError:
            raise RuntimeError(f"HTTP {e.code}") from None
    if body.get("status") != "success":
        raise RuntimeError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
    data: dict[str, Any] = body["data"]
    return data


def check_queries(
    url: str,
    queries: Iterable[Query],
    *,
    start: float | None = None,
    end: float | None = None,
    step: float = 2.0,
) -> list[Failure]:
    """The queries that fail or return no series with a value on the Prometheus at ``url``.

    With ``start`` and ``end`` each query runs over that range as Grafana runs a
    panel (instant targets at ``end``), so an event anywhere in the range counts;
    without them, as an instant query now.
    """
    failures: list[Failure] = []
    for q in queries:
        try:
            data = run_query(
                url,
                q.promql,
                start=None if q.instant else start,
                end=end,
                step=step,
            )
        except (RuntimeError, OSError, ValueError) as e:
            failures.append(Failure(q, f"error: {e}"))
            continue
        if not _has_value(data):
            failures.append(Failure(q))
    return failures
