"""``tickscale loadtest --suite``: its cases, its table and JSON, and the fail-fast of a run
whose group has no members, on the session's real broker and Redis."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from ingest.codecs.jsonfeed import decode_json
from ingest.replay.spec import SourceSpec
from scaler.lag import LagProbe
from tickscale.loadtest.chaos import KINDS, SERVICE
from tickscale.loadtest.feed import build_manifest
from tickscale.loadtest.runner import LoadTest, parse_policy
from tickscale.loadtest.sampler import ReplayClock, Sample, Sampler
from tickscale.loadtest.stack import Services
from tickscale.loadtest.suite import (
    CASES,
    DAY,
    WINDOW,
    Case,
    DrillRun,
    Env,
    Outcome,
    cases_of,
    expected_ticks,
    itch_with_garbage,
    jsonl_with_bad_lines,
    judge_bad_input,
    judge_drill,
    run_suite,
    select,
)
from tickscale.loadtest.watch import NoMembers
from tickscale.localstack.net import free_port
from tickscale.localstack.topics import MakeTopics

NO_MEMBERS = re.compile(
    r"^the handlers' group has had no members for (\d+)s with ([\d,]+) records waiting$"
)


class NoFleet(LoadTest):
    """A run whose scaler starts no handler: the group stays empty while records wait."""

    def _scaler_command(self) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(600)"]


def _no_fleet(env: Env, name: str) -> Outcome:
    # A fleet allowed to idle at zero is not waited for; a slow replay keeps records coming
    # long after the run should have given up.
    cfg = env.config(
        name, policy=parse_policy("tickscale", 0, 1), no_members_s=5.0, speed="2", end="09:45"
    )
    return env.run(cfg)


def _expect_no_members(o: Outcome) -> list[str]:
    if o.error is not None and NO_MEMBERS.match(o.error):
        return []
    return [f"expected the no-members stop, got {o.error or 'a result'}"]


@pytest.mark.slow
def test_fail_fast_and_the_suite_table_and_json(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    svc = Services(kafka_bootstrap, redis_url, "local")
    cases = [
        Case("no-fleet", "no handler ever starts", _no_fleet, _expect_no_members),
        Case("no-fleet-as-drill", "the same, judged as a drill", _no_fleet),
    ]
    buf = io.StringIO()
    console = Console(file=buf, width=220)
    out, json_path = tmp_path / "suite", tmp_path / "suite.json"
    rc, doc = run_suite(
        "test", cases, out, console, json_path, services=svc, env_kw={"make_loadtest": NoFleet}
    )
    text = buf.getvalue()
    assert rc == 1, text
    a, b = doc["cases"]
    # The run stopped on the empty group, with the reason, long before its replay ended.
    m = NO_MEMBERS.match(a["error"] or "")
    assert m is not None, a
    assert int(m.group(1)) >= 5 and int(m.group(2).replace(",", "")) > 0
    console_log = (out / "no-fleet" / "console.log").read_text()
    assert "error: the handlers' group has had no members" in console_log
    assert "replay done" not in console_log and "checking the ledger" not in console_log
    assert a["ok"] and a["problems"] == [] and a["happened"].startswith("stopped: the handlers'")
    assert not b["ok"] and NO_MEMBERS.match(b["problems"][0]), b
    assert a["ledger"]["missing"] is None and a["recovery_s"] is None
    assert not doc["ok"] and doc["suite"] == "test"
    # --json and the suite's own file hold the same document.
    assert orjson.loads(json_path.read_bytes()) == orjson.loads((out / "suite.json").read_bytes())
    assert orjson.loads(json_path.read_bytes())["cases"][0]["name"] == "no-fleet"
    # One table: a row per case with its verdict.
    for col in ("case", "what happened", "ledger", "recovery s", "verdict"):
        assert col in text
    assert "suite test: 1/2 pass" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("│ no-fleet")]
    assert len(rows) == 2 and "PASS" in rows[0] and "FAIL" in rows[1], text


def test_the_reliability_cases_cover_every_drill_and_bad_input() -> None:
    cases = cases_of("reliability")
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    drills = [c.run for c in cases if isinstance(c.run, DrillRun)]
    alone = {d.specs[0].kind for d in drills if len(d.specs) == 1}
    assert alone == set(KINDS)
    pairs = [d for d in drills if len(d.specs) == 2]
    assert pairs and all(len({SERVICE[s.kind] for s in d.specs}) == 2 for d in pairs)
    assert any(d.overrides.get("malformed_every") for d in drills)
    assert {"jsonl-bad-lines", "itch-garbage", "poison-records"} <= set(names)
    assert [c.name for c in select(CASES, "redis-kill, kill-handler")] == [
        "kill-handler",
        "redis-kill",
    ]
    for bad in ("kill-nothing", " , "):
        try:
            select(CASES, bad)
        except ValueError as e:
            assert "unknown case" in str(e)
        else:
            raise AssertionError(f"{bad!r} accepted")


def test_only_names_cases_and_an_unknown_one_is_a_usage_error() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "tickscale", "loadtest", "--suite", "reliability",
         "--only", "kill-handler,broker-explode"],
        capture_output=True, text=True, timeout=60, env=os.environ | {"COLUMNS": "200"},
    )  # fmt: skip
    assert p.returncode == 2
    assert "unknown case broker-explode" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_bad_input_files_hold_bad_records_among_good_ones(tmp_path: Path) -> None:
    f = jsonl_with_bad_lines(tmp_path)
    dirty, clean = f.dirty, f.clean
    assert f.source == "jsonl" and f.exact
    good = clean.read_bytes().splitlines()
    lines = dirty.read_bytes().splitlines()
    bad = [ln for ln in lines if ln not in set(good)]
    assert len(lines) == len(good) + len(bad) and len(bad) == f.bad >= 10
    for ln in good:
        decode_json(ln)  # every clean line is valid
    for ln in bad:
        try:
            decode_json(ln)
        except ValueError:
            continue
        raise AssertionError(f"{ln!r} decodes")
    assert expected_ticks(clean, "jsonl") > 1000
    # Every bad line lies inside the replayed window: each becomes one expected dead letter.
    src, _, day, _ = SourceSpec(
        source="jsonl", symbols=1, seed=1, file=dirty, day=DAY, start=WINDOW[0], end=WINDOW[1]
    ).build()
    assert build_manifest(list(src), day, "t", 4).deadletters_expected == f.bad

    f = itch_with_garbage(tmp_path)
    assert f.source == "itch" and f.bad == 3
    cb, db = f.clean.read_bytes(), f.dirty.read_bytes()
    assert len(db) > len(cb) and db[:1000] == cb[:1000]
    assert expected_ticks(f.clean, "itch") > 1000


def _result(**kw: object) -> dict[str, object]:
    r: dict[str, object] = {
        "ledger_ok": True, "missing": 0, "duplicated": 0, "reordered": 0,
        "checksum_mismatch": 0, "ticks_read": 10, "ticks_expected": 10, "drained": True,
        "chaos": [{"kind": "broker-kill", "ok": True, "detail": "x"}],
        "recoveries": [{"label": "broker-kill end at +11s", "recovery_s": 12.0}],
        "deadletters": 3, "deadletters_expected": 3,
    }  # fmt: skip
    r.update(kw)
    return r


def test_judges() -> None:
    assert judge_drill(Outcome(result=_result())) == []
    assert judge_drill(Outcome(error="the replay feed failed")) == ["the replay feed failed"]
    slow = _result(recoveries=[{"label": "kill-scaler end at +16s", "recovery_s": 75.0}])
    assert judge_drill(Outcome(result=slow)) == ["kill-scaler end at +16s: recovery 75s > 60s"]
    never = _result(recoveries=[{"label": "broker-pause end at +16s", "recovery_s": None}])
    assert "never back under target" in judge_drill(Outcome(result=never))[0]
    lost = _result(missing=2, ticks_read=8, ledger_ok=False)
    assert judge_drill(Outcome(result=lost)) == ["missing=2", "ticks 8/10", "ledger FAIL"]
    failed = _result(chaos=[{"kind": "kill-scaler", "ok": False, "detail": "failed: boom"}])
    assert judge_drill(Outcome(result=failed)) == ["kill-scaler: failed: boom"]
    assert judge_bad_input(Outcome(result=_result(), facts={"clean_ticks": 10})) == []
    swallowed = judge_bad_input(Outcome(result=_result(), facts={"clean_ticks": 12}))
    assert swallowed and "good records lost" in swallowed[0]
    assert judge_bad_input(Outcome(result=_result(deadletters=1))) == ["deadletters 1/3"]
    # A file's every bad line is one dead letter, and no good line is one.
    assert judge_bad_input(Outcome(result=_result(), facts={"bad_records": 3, "exact": True})) == []
    more = judge_bad_input(Outcome(result=_result(), facts={"bad_records": 2, "exact": True}))
    assert more == ["3 dead letters expected for 2 bad records in the file"]
    assert judge_bad_input(Outcome(result=_result(), facts={"bad_records": 2})) == []


def test_no_members_watch_counts_only_known_empty_stretches_with_lag() -> None:
    w = NoMembers(limit_s=10.0)

    def see(t: float, members: int | None, lag: int | None) -> str | None:
        return w.observe(Sample(wall=t, members=members, lag_msgs=lag))

    assert see(100, 0, 50) is None  # the clock starts
    assert see(105, None, None) is None  # broker unreadable: no evidence either way
    assert see(109, 0, 60) is None
    reason = see(110, 0, 70)
    assert reason == "the handlers' group has had no members for 10s with 70 records waiting"
    assert see(110, 0, 70) is None  # a sample is looked at once
    # A member, or nothing waiting, ends the stretch.
    for members, lag in ((1, 70), (0, 0)):
        w = NoMembers(limit_s=10.0)
        assert see(100, 0, 5) is None and see(105, members, lag) is None
        assert see(112, 0, 5) is None and see(121, 0, 5) is None and see(122, 0, 5) is not None
    assert NoMembers(limit_s=0).observe(Sample(wall=1e9, members=0, lag_msgs=9)) is None


async def test_sampler_counts_live_handler_processes_not_the_scalers_list(
    make_topics: MakeTopics, redis_url: str, tmp_path: Path
) -> None:
    """A scaler killed without a shutdown leaves a targets file naming handlers that have
    exited: the count follows the processes, and the group's members come from the broker."""
    ts = await make_topics(raw_partitions=2)
    fleet = f"lt-test-{uuid.uuid4().hex[:6]}"
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([
        {"targets": [f"127.0.0.1:{free_port()}"], "labels": {"container": f"handler-{fleet}-{i}"}}
        for i in (1, 2)
    ]))  # fmt: skip
    handler = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "tickscale", "handler"],
        env=os.environ | {"TICKSCALE_HANDLER_HANDLER_ID": f"handler-{fleet}-2"},
    )  # fmt: skip
    probe = LagProbe(ts.bootstrap, ts.raw, ts.group)
    sampler = Sampler(probe, redis_url, "x", targets, ReplayClock(), fleet=fleet)
    await sampler.start()

    async def sample() -> Sample:
        # A topic just created may not be in the broker's metadata for a moment.
        for _ in range(60):
            s = await sampler.sample_once()
            if s.members is not None:
                return s
            await asyncio.sleep(0.5)
        raise AssertionError("the broker never answered the lag probe")

    try:
        s = await sample()
        assert s.handlers == 1 and s.members == 0, s
        handler.kill()
        handler.wait()
        s = await sample()
        assert s.handlers == 0 and s.members == 0, s
    finally:
        await sampler.close()
        if handler.poll() is None:
            handler.kill()
            handler.wait()


@pytest.mark.slow
def test_replay_input_case_runs_every_bad_input_for_real(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    """The suite's replay-input case runs the real command against the session broker: each
    input ends with one error line and exit 2; a judge that saw a traceback would fail it."""
    from tickscale.loadtest.suite import judge_replay_input, replay_input_run

    env = Env(Services(kafka_bootstrap, redis_url, "local"), tmp_path)
    o = replay_input_run(env, "replay-input")
    checks = o.facts["checks"]
    assert len(checks) == 8
    assert judge_replay_input(o) == [], checks
    assert all(c["exit"] == 2 and c["error_lines"] == 1 for c in checks)
    bad = Outcome(facts={"checks": [dict(checks[0], exit=1, traceback=True)]})
    want = f"{checks[0]['input']}: exit 1, 1 error line(s), a traceback"
    assert judge_replay_input(bad) == [want]
