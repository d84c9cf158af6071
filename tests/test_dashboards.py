"""The Grafana dashboards: well-formed, on declared metrics, and every query shows data.

The fast tests read the dashboard JSON only. The end-to-end test runs the real
services on loopback (broker, Redis, the scaler with its process backend, the
handlers it starts, a replayed window with malformed messages) under a real
Prometheus that discovers the handlers from the scaler's file_sd list as the
compose Prometheus does from Docker, and then asks that Prometheus every query
every dashboard runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

import ingest.metrics
import scaler.metrics
from tests.pipeline_utils import start_replay
from tickscale.dashboards import (
    EVENT_ONLY,
    Query,
    all_values,
    check_queries,
    extract_queries,
    iter_panels,
    load_dashboards,
    metric_names,
    render,
    run_query,
)
from tickscale.localstack import PrometheusServer
from tickscale.localstack.net import HOST, free_port
from tickscale.localstack.topics import TopicSet

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose"
DASHBOARD_DIR = REPO / "grafana" / "dashboards"
DASHBOARDS = load_dashboards(DASHBOARD_DIR)
QUERIES = [q for name, d in DASHBOARDS.items() for q in extract_queries(name, d)]

# Queries allowed to return no data in the end-to-end run (no rollout happens
# in it); one that does return data fails the test so the entry is removed.
EXEMPT = EVENT_ONLY


def _provisioned_uid() -> str:
    text = (COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text()
    uids = re.findall(r"^\s*uid:\s*[\"']?([\w-]+)", text, re.M)
    assert len(uids) == 1, text
    return uids[0]


def _declared_metrics() -> set[str]:
    """Sample names the handler and scaler metric modules expose."""
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
    }
    names: set[str] = set()
    for module in (ingest.metrics, scaler.metrics):
        for obj in vars(module).values():
            if isinstance(obj, MetricWrapperBase):
                for family in obj.describe():
                    names.update(family.name + s for s in suffixes[family.type])
    return names


# --- the JSON alone -----------------------------------------------------------------------


def test_the_three_dashboards_parse_with_unique_uids() -> None:
    assert set(DASHBOARDS) == {"overview", "handlers", "scaler"}
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids), uids
    for name, d in DASHBOARDS.items():
        assert 36 <= d["schemaVersion"] <= 41, name
        assert d["title"].startswith("tickscale"), name
        # Kept readable and diffable: indent 2, as written by json.dumps(indent=2).
        text = (DASHBOARD_DIR / f"{name}.json").read_text()
        assert text == json.dumps(d, indent=2) + "\n", f"{name}.json is not indent-2 JSON"


def test_every_query_uses_the_provisioned_datasource() -> None:
    uid = _provisioned_uid()
    for name, d in DASHBOARDS.items():
        for panel in iter_panels(d):
            if panel["type"] == "row":
                assert not panel.get("targets"), f"{name}: row {panel['title']} has targets"
                continue
            where = f"{name}: panel {panel['id']} {panel['title']!r}"
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, where
            assert panel["targets"], f"{where} has no query"
            for t in panel["targets"]:
                assert t.get("datasource", panel["datasource"])["uid"] == uid, where
        for ann in d["annotations"]["list"]:
            assert ann["datasource"]["uid"] == uid, f"{name}: annotation {ann['name']}"
        for var in d["templating"]["list"]:
            assert var["datasource"]["uid"] == uid, f"{name}: variable {var['name']}"


def test_queries_use_only_declared_metrics() -> None:
    declared = _declared_metrics()
    assert "tickscale_handler_messages_in_total" in declared
    assert "tickscale_scaler_poll_seconds_bucket" in declared
    used: set[str] = set()
    for q in QUERIES:
        names = metric_names(q.promql)
        assert names, f"{q.dashboard}: {q.where} selects no metric: {q.promql}"
        unknown = names - declared
        assert not unknown, f"{q.dashboard}: {q.where} uses undeclared {sorted(unknown)}"
        used |= names
    # Every panel the brief asks for exists: spot-check the key series are charted.
    for needed in (
        "tickscale_handler_e2e_latency_seconds_bucket",
        "tickscale_handler_deadletters_total",
        "tickscale_handler_sequence_gaps_total",
        "tickscale_scaler_signal_proposal_handlers",
        "tickscale_scaler_session",
        "tickscale_scaler_lag_seconds",
    ):
        assert needed in used, needed


def test_panel_ids_are_unique_per_dashboard() -> None:
    for name, d in DASHBOARDS.items():
        ids = [p["id"] for p in iter_panels(d)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids {sorted(ids)}"


def test_rate_windows_use_rate_interval() -> None:
    window = re.compile(r"\b(?:rate|irate|increase)\((?:[^()\[]|\([^()]*\))*\[([^\]]+)\]")
    for name, d in DASHBOARDS.items():
        for panel in iter_panels(d):
            for t in panel.get("targets", []):
                for w in window.findall(t["expr"]):
                    assert w == "$__rate_interval", f"{name}: {panel['title']}: [{w}]"


def test_handler_drilldown_filters_on_its_variables() -> None:
    d = DASHBOARDS["handlers"]
    assert {v["name"] for v in d["templating"]["list"]} == {"container", "instance"}
    assert all_values(d) == {"container": ".*", "instance": ".*"}
    for panel in iter_panels(d):
        for t in panel.get("targets", []):
            for sel in re.findall(r"tickscale_handler_\w+(\{[^}]*\})?", t["expr"]):
                assert '"$container"' in sel and '"$instance"' in sel, t["expr"]


def test_provisioning_serves_the_dashboard_folder() -> None:
    """The provider's path is where compose mounts a directory holding grafana/dashboards."""
    provider = (COMPOSE / "grafana/provisioning/dashboards/tickscale.yml").read_text()
    (path,) = re.findall(r"^\s*path:\s*(\S+)", provider, re.M)
    compose = (COMPOSE / "docker-compose.yml").read_text()
    block = re.search(r"^  grafana:\n((?:(?:    .*)?\n)*)", compose, re.M)
    assert block, "no grafana service in compose/docker-compose.yml"
    service = block.group(1)
    mounts = dict(
        (dst, src)
        for src, dst in re.findall(r"^\s*-\s*([^:\s]+):([^:\s]+)(?::ro)?\s*$", service, re.M)
    )
    assert path in mounts, (path, mounts)
    host_dir = (COMPOSE / mounts[path]).resolve()
    # Grafana's file provider walks the directory recursively.
    assert DASHBOARD_DIR.resolve().is_relative_to(host_dir), (host_dir, DASHBOARD_DIR)
    assert "/etc/grafana/provisioning" in mounts


def test_render_turns_variables_into_plain_promql() -> None:
    v = {"container": ".*", "instance": "a|b"}
    assert (
        render('rate(x{container="$container", instance=~"${instance}"}[$__rate_interval])', v)
        == 'rate(x{container=~".*", instance=~"a|b"}[1m])'
    )
    assert render('x{c=~"[[container]]"}[$__interval]', v) == 'x{c=~".*"}[15s]'
    # A label_replace back-reference is not a variable.
    assert render('label_replace(x, "a", "$1", "b", "(.*)")', v).count("$1") == 1
    with pytest.raises(ValueError, match=r"\$contianer"):
        render('x{container=~"$contianer"}', v)


def test_metric_names_skip_functions_labels_and_keywords() -> None:
    expr = (
        'sum by (le, kind) (rate(a_total{kind="x y", le!="+Inf"}[5m] offset 1m)) '
        "/ on (kind) group_left (z) b > 1e3 and c unless max(d) or vector(1)"
    )
    assert metric_names(expr) == {"a_total", "b", "c", "d"}


# --- the queries against real services ----------------------------------------------------


class _ScrapeLikeCompose(PrometheusServer):
    """Scrapes as compose/prometheus does: handlers found through a file_sd list, the scaler.

    The process backend writes that list (labels job="handler", container=<id>),
    the way the compose Prometheus finds handler containers through Docker.
    """

    def __init__(self, handler_sd: Path, scaler_target: str, work_dir: Path) -> None:
        super().__init__(scrape_interval="1s", work_dir=work_dir)
        self.handler_sd = handler_sd
        self.scaler_target = scaler_target

    def _write_config(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.work_dir / "prometheus.yml"
        cfg.write_text(
            json.dumps(
                {
                    "global": {
                        "scrape_interval": self.scrape_interval,
                        "scrape_timeout": self.scrape_interval,
                        "evaluation_interval": self.scrape_interval,
                    },
                    "scrape_configs": [
                        {
                            "job_name": "handler",
                            "file_sd_configs": [
                                {"files": [str(self.handler_sd)], "refresh_interval": "1s"}
                            ],
                        },
                        {
                            "job_name": "scaler",
                            "static_configs": [{"targets": [self.scaler_target]}],
                        },
                    ],
                },
                indent=2,
            )
        )
        return cfg


def _two_free_ports() -> int:
    """A port whose successor is free too (the scaler's handlers take base, base+1)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind((HOST, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def _handler_pids(group: str) -> list[int]:
    """Handler processes of this test's group still alive (the scaler should have stopped them)."""
    needle = f"TICKSCALE_HANDLER_GROUP={group}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
    return pids


async def _wait_for(prom: PrometheusServer, promql: str, within_s: float, why: str) -> None:
    deadline = time.monotonic() + within_s
    while not prom.query(promql):
        assert time.monotonic() < deadline, f"{why}: {promql} still empty after {within_s:.0f}s"
        await asyncio.sleep(1.0)


@pytest.mark.slow
async def test_every_dashboard_query_returns_data(
    topics: TopicSet, redis_url: str, tmp_path: Path
) -> None:
    """Scaler (process backend) + handlers + replay with dead letters, scraped every second.

    The run is shaped so every panel has something to show: the scaler starts
    one handler (minimum), then the replayed open raises the session floor and
    it scales to two (a scale event, a rebalance, restores on the first
    handler), and malformed messages produce dead letters and decode errors.
    """
    state = tmp_path / "scaler"
    state.mkdir()
    scaler_port = free_port()
    prom = _ScrapeLikeCompose(state / "targets.json", f"{HOST}:{scaler_port}", tmp_path / "prom")
    t0 = time.time()
    prom.start()
    try:
        await _scale_replay_and_check(prom, topics, redis_url, tmp_path, state, scaler_port, t0)
    finally:
        prom.close()


async def _scale_replay_and_check(
    prom: PrometheusServer,
    topics: TopicSet,
    redis_url: str,
    tmp_path: Path,
    state: Path,
    scaler_port: int,
    t0: float,
) -> None:
    scaler_log = (tmp_path / "scaler.log").open("wb")
    env = dict(
        os.environ,
        TICKSCALE_SCALER_OUT_TOPIC=topics.ticks,
        TICKSCALE_SCALER_DEADLETTER_TOPIC=topics.deadletter,
        # Inherited by the handlers: a killed one leaves the group sooner.
        TICKSCALE_HANDLER_SESSION_TIMEOUT_MS="6000",
    )
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "tickscale", "scaler",
            "--backend", "process",
            "--bootstrap", topics.bootstrap,
            "--redis-url", redis_url,
            "--topic", topics.raw,
            "--group", topics.group,
            "--metrics-port", str(scaler_port),
            "--handler-base-port", str(_two_free_ports()),
            "--state-dir", str(state),
            # Its own lease and handler names, whatever else shares this Redis.
            "--name", f"dash-{uuid.uuid4().hex[:8]}",
            "--min-handlers", "1",
            "--max-handlers", "2",
            "--calendar", "XNYS",
            "--clock", "replay",
            "--stop-grace", "15",
        ],
        stdout=scaler_log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip

    def logs() -> str:
        out = [f"--- scaler\n{(tmp_path / 'scaler.log').read_text(errors='replace')[-3000:]}"]
        for f in sorted((state / "logs").glob("*.log")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}")
        return "\n".join(out)

    replay: subprocess.Popen[bytes] | None = None
    try:
        # Before the replay publishes its clock there is no session: the
        # minimum decides, and the first handler must own every partition.
        await _wait_for(
            prom,
            f"sum(tickscale_handler_assigned_partitions) >= {topics.raw_partitions}",
            120,
            f"the scaler's first handler never took the partitions\n{logs()}",
        )
        replay = start_replay(
            topics,
            tmp_path / "m.json",
            tmp_path / "replay.log",
            "--symbols", "8", "--seed", "21", "--date", "2024-11-25",
            "--from", "09:29", "--to", "09:33", "--speed", "10",
            "--malformed-every", "300",
            "--redis", redis_url,
        )  # fmt: skip
        # The replayed open raises the session floor to 8, capped at 2 (the rate
        # signal may get there first; either way the count steps up mid-replay).
        await _wait_for(
            prom,
            "max(tickscale_scaler_running_handlers) >= 2",
            90,
            f"the scaler never scaled to two handlers\n{logs()}",
        )
        deadline = time.monotonic() + 90
        while replay.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "replay.log").read_text()[-2000:]
            await asyncio.sleep(1.0)
        assert replay.returncode == 0, (tmp_path / "replay.log").read_text()[-2000:]
        await _wait_for(
            prom, "sum(tickscale_handler_deadletters_total) > 0", 60, f"no dead letters\n{logs()}"
        )

        # Scrapes are asynchronous and rates need two samples in their window:
        # poll until every query has shown data somewhere in the run.
        checked = [q for q in QUERIES if (q.dashboard, q.where) not in EXEMPT]
        deadline = time.monotonic() + 60
        while True:
            failures = check_queries(prom.url, checked, start=t0, end=time.time(), step=1.0)
            if not failures or time.monotonic() > deadline:
                break
            await asyncio.sleep(2.0)
        assert not failures, "\n".join(map(str, failures)) + "\n" + logs()

        for key, reason in EXEMPT.items():
            (q,) = [q for q in QUERIES if (q.dashboard, q.where) == key]
            data = run_query(prom.url, q.promql, start=t0, end=time.time(), step=1.0)
            assert not data["result"], f"{key} has data now: drop its exemption ({reason})"
        assert len(checked) + len(EXEMPT) == len(QUERIES)
    finally:
        if replay is not None and replay.poll() is None:
            replay.kill()
            replay.wait(10)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the scaler drains and stops its handlers
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        scaler_log.close()
        for pid in _handler_pids(topics.group):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_check_reports_empty_and_broken_queries(tmp_path: Path) -> None:
    """The checker itself: a query on a missing metric and a malformed one both fail."""
    with PrometheusServer(work_dir=tmp_path / "prom") as prom:
        # Prometheus scrapes nothing here, but evaluates constant expressions.
        good = Query("t", "good", "vector(1)", "vector(1)")
        empty = Query("t", "empty", "x", "tickscale_no_such_metric")
        broken = Query("t", "broken", "x", "sum(rate(")
        failures = check_queries(prom.url, [good, empty, broken])
        assert [(f.query.where, f.error is None) for f in failures] == [
            ("empty", True),
            ("broken", False),
        ]
        assert "parse error" in str(failures[1].error)
        nan = Query("t", "nan", "x", "vector(0) / vector(0)")
        assert check_queries(prom.url, [nan], start=time.time() - 10, end=time.time()) != []
