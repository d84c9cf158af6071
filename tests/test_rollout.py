"""Handler rollouts on the process backend: a good version promoted, a faulty one rolled
back, an abort by hand, the ledger exact through all of them, every step audited."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from redis.asyncio import Redis

from core.constants import REDIS_SCALER_EVENTS
from scaler.audit import read_events
from scaler.backends.base import HandlerSpec, HandlerVersion
from scaler.backends.process import ProcessBackend
from scaler.guard import Figures, GuardConfig, GuardError, enough_records, judge, poisson_bound
from scaler.handover import Handover, Outcome, Pending
from scaler.lag import LagProbe
from tests.pipeline_utils import start_replay, summary
from tests.test_scaler import ScalerProc
from tickscale.localstack.net import free_port
from tickscale.localstack.topics import TopicSet

GOOD = shlex.join([sys.executable, "-m", "tickscale", "handler"])
FAULTY = shlex.join([sys.executable, "-m", "tests.rollout_faulty_handler"])
GUARD = "warmup_s=5,window_s=10,min_records=50,step_s=2,max_wait_s=120"


def test_guard_overrides_are_checked() -> None:
    cfg = GuardConfig.parse("window_s=30, restarts=1")
    assert (cfg.window_s, cfg.restarts, cfg.p99_ratio) == (30.0, 1, 1.5)
    assert GuardConfig.parse("p99_ratio=3", cfg).window_s == 30.0
    for bad in ("windows=3", "window_s", "window_s=x", "restarts=-1"):
        with pytest.raises(GuardError):
            GuardConfig.parse(bad)


def test_guard_compares_the_canary_with_the_current_version() -> None:
    cfg = GuardConfig()
    cur, good, bad = Figures(), Figures(), Figures()
    cur.add({"records": 10_000, "deadletters": 5, "e2e_buckets": [0] * 5 + [100] * 14}, None)
    good.add({"records": 2_000, "deadletters": 2, "e2e_buckets": [0] * 5 + [50] * 14}, None)
    bad.add({"records": 2_000, "deadletters": 200, "e2e_buckets": [0] * 5 + [50] * 14}, None)
    assert judge(cfg, good, cur, 0) is None
    assert "deadletters per 1,000 records 100.00" in (judge(cfg, bad, cur, 0) or "")
    assert "restarts" in (judge(cfg, good, cur, 1) or "")
    slow = Figures()
    slow.add({"records": 2_000, "e2e_buckets": [0] * 13 + [50] * 6}, None)  # p99 in (0.5, 1]
    assert "p99" in (judge(cfg, slow, cur, 0) or "")
    assert judge(cfg, slow, cur, 0, final=False) is None  # latency waits for the window
    # The current side counts from the window's baseline.
    base = {"records": 9_000, "deadletters": 5, "e2e_buckets": [0] * 19}
    windowed = Figures()
    windowed.add({"records": 10_000, "deadletters": 5}, base)
    assert (windowed.records, windowed.deadletters) == (1_000, 0)


def test_no_verdict_before_both_sides_have_records() -> None:
    """Seen on the compose stack: a second into the window the canary had 966 records and
    one dead letter of a feed that has some anyway, the current side none yet; judged then,
    the canary was rolled back for 1.04 dead letters per 1,000 against 0."""
    cfg = GuardConfig()
    canary, current = Figures(), Figures()
    canary.add({"records": 966, "deadletters": 1, "assigned": 4}, None)
    current.add({"records": 0, "assigned": 8}, None)
    assert not enough_records(cfg, canary, current)
    current.add({"records": 1_900, "deadletters": 4}, None)  # the same feed, 2 per 1,000
    assert enough_records(cfg, canary, current)
    assert judge(cfg, canary, current, 0, final=False) is None
    # No partition on the current side: the canary alone, against the margins.
    alone = Figures()
    alone.add({"records": 0, "assigned": 0}, None)
    assert enough_records(cfg, canary, alone)
    few = Figures()
    few.add({"records": cfg.min_records - 1, "assigned": 4}, None)
    assert not enough_records(cfg, few, current)


def test_a_few_bad_records_more_than_the_fleet_are_chance_not_a_regression() -> None:
    """Seen on the compose stack a second into the window: the canary had 3 dead letters in
    440 records (6.8 per 1,000), the fleet 3 in 1,861 (1.6): chance for a Poisson count of
    mean 1.1. One in ten records, as a faulty version spoils, is not."""
    cfg = GuardConfig()
    fleet, canary, faulty = Figures(), Figures(), Figures()
    fleet.add({"records": 1_861, "deadletters": 3, "assigned": 8}, None)
    canary.add({"records": 440, "deadletters": 3, "assigned": 4}, None)
    faulty.add({"records": 440, "deadletters": 44, "assigned": 4}, None)
    assert judge(cfg, canary, fleet, 0, final=False) is None
    assert "deadletters per 1,000 records 100.00" in (judge(cfg, faulty, fleet, 0) or "")
    assert poisson_bound(1.14) == 6  # P(X > 6) < 0.001 <= P(X > 5) for a mean of 1.14
    assert poisson_bound(0.0) == 0


def _rollout(
    ts: TopicSet, redis_url: str, name: str, *args: str
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tickscale", "rollout", "--name", name,
           "--redis-url", redis_url, "--timeout", "240", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _fleet(tmp: Path, name: str) -> list[str]:
    rec = json.loads((tmp / "scaler" / f"fleet-{name}.json").read_text())
    return sorted(h["version"] for h in rec["handlers"])


async def _verify_ticks(ts: TopicSet, manifest: Path) -> dict[str, int]:
    # Without the dead-letter topic: the faulty canary adds dead letters on purpose.
    cmd = [sys.executable, "-m", "tickscale", "verify", "--bootstrap", ts.bootstrap,
           "--topic", ts.ticks, "--manifest", str(manifest), "--timeout", "120",
           "--deadletter-topic", ""]  # fmt: skip
    r = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return summary(r.stdout + r.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("topics", [6], indirect=True)
async def test_promote_a_good_version_roll_back_a_faulty_one_ledger_exact(
    topics: TopicSet, redis_url: str, tmp_path: Path
) -> None:
    name = f"r{os.getpid()}{int(time.time()) % 100000}"
    sc = ScalerProc(
        topics, redis_url, tmp_path, "--name", name, "--min-handlers", "2",
        "--max-handlers", "3", "--calendar", "none", "--scale-down-window", "600",
    )  # fmt: skip
    rp = None
    try:
        await asyncio.to_thread(sc.wait_for, "tickscale_scaler_running_handlers",
                                lambda v: v >= 2, 60)  # fmt: skip
        manifest = tmp_path / "manifest.json"
        rp = start_replay(topics, manifest, tmp_path / "replay.log", "--symbols", "20",
                          "--from", "09:30", "--to", "10:30", "--speed", "30")  # fmt: skip
        good = await asyncio.to_thread(
            _rollout, topics, redis_url, name, "--command", GOOD, "--version", "v2",
            "--guard", GUARD,
        )  # fmt: skip
        assert good.returncode == 0, good.stdout + good.stderr + sc.log()[-3000:]
        assert "promoted v2" in good.stdout
        assert set(_fleet(tmp_path, name)) == {"v2"}
        bad = await asyncio.to_thread(
            _rollout, topics, redis_url, name, "--command", FAULTY, "--version", "bad",
            "--guard", GUARD,
        )  # fmt: skip
        assert bad.returncode == 1, bad.stdout + bad.stderr + sc.log()[-3000:]
        assert "rolled back: deadletters per 1,000 records" in bad.stderr
        assert set(_fleet(tmp_path, name)) == {"v2"}
        assert await asyncio.to_thread(rp.wait, 300) == 0
        assert await _verify_ticks(topics, manifest) == {
            "missing": 0, "duplicated": 0, "reordered": 0, "checksum_mismatch": 0,
        }  # fmt: skip
        r = Redis.from_url(redis_url)
        try:
            events = await read_events(r, f"{REDIS_SCALER_EVENTS}:{name}", kind="rollout")
        finally:
            await r.aclose()
        steps = [(e["version"], e["event"]) for e in events]
        first = [ev for v, ev in steps if v == "v2"]
        assert first[:3] == ["canary", "window", "passed"], steps
        # One step per old handler left beside the canary (how many the policy wanted
        # then varies with the load), each replacing one, until none is left.
        step_details = [e["detail"] for e in events if (e["version"], e["event"]) == ("v2", "step")]
        assert first[-1] == "promoted" and step_details, steps
        assert [d["old_left"] for d in step_details] == list(range(len(step_details)))[::-1]
        assert all(d["started"] == 1 for d in step_details), step_details
        assert [ev for v, ev in steps if v == "bad"] == [
            "canary", "window", "rolling_back", "rolled_back"
        ], steps  # fmt: skip
        promoted = events[[e["event"] for e in events].index("passed")]
        assert promoted["detail"]["canary"]["records"] >= 50
        # The steps the dashboards' rollout annotation shows, as the scaler exports them.
        exported = sc.metrics()
        for event, times in (("canary", 2), ("promoted", 1), ("rolled_back", 1)):
            line = f'tickscale_scaler_rollout_events_total{{event="{event}"}} {float(times)}'
            assert line in exported, [ln for ln in exported.splitlines() if "rollout" in ln]
    finally:
        if rp is not None and rp.poll() is None:
            rp.kill()
        assert sc.stop() == 0, sc.log()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("topics", [4], indirect=True)
async def test_a_restarted_scaler_resumes_the_rollout_and_abort_rolls_it_back(
    topics: TopicSet, redis_url: str, tmp_path: Path
) -> None:
    """The scaler is killed while the canary runs; its successor adopts the fleet and
    the rollout with it, and ``--abort`` then takes the canary back."""
    name = f"a{os.getpid()}{int(time.time()) % 100000}"
    args = ("--name", name, "--min-handlers", "2", "--max-handlers", "2", "--calendar", "none")
    sc = ScalerProc(topics, redis_url, tmp_path, *args)
    sc2 = None
    r = Redis.from_url(redis_url)
    stream = f"{REDIS_SCALER_EVENTS}:{name}"
    try:
        await asyncio.to_thread(sc.wait_for, "tickscale_scaler_running_handlers",
                                lambda v: v >= 2, 60)  # fmt: skip
        follower = subprocess.Popen(
            [sys.executable, "-m", "tickscale", "rollout", "--name", name, "--redis-url",
             redis_url, "--command", GOOD, "--version", "v2", "--guard", "window_s=3600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while not [e for e in await read_events(r, stream, kind="rollout")
                   if e["event"] == "window"]:  # fmt: skip
            assert time.monotonic() < deadline, sc.log()[-3000:]
            await asyncio.sleep(0.5)
        assert sorted(_fleet(tmp_path, name)) == ["default", "v2"]
        sc.proc.kill()  # no orderly stop: handlers and rollout are left as they are
        sc.proc.wait(10)
        sc2 = ScalerProc(topics, redis_url, tmp_path, *args)
        await asyncio.to_thread(sc2.wait_for, "tickscale_scaler_leader", lambda v: v == 1, 60)
        # The successor keeps the canary running (it resumed, it did not start over).
        await asyncio.sleep(3)
        assert sorted(_fleet(tmp_path, name)) == ["default", "v2"]
        ab = await asyncio.to_thread(_rollout, topics, redis_url, name, "--abort")
        assert ab.returncode == 1, ab.stdout + ab.stderr + sc2.log()[-3000:]
        assert "rolled back: aborted by hand" in ab.stderr
        assert follower.wait(60) == 1
        assert _fleet(tmp_path, name) == ["default", "default"]
        events = [e["event"] for e in await read_events(r, stream, kind="rollout")]
        assert events == ["canary", "window", "rolling_back", "rolled_back"], events
    finally:
        await r.aclose()
        if sc.proc.poll() is None:
            sc.proc.kill()
        if sc2 is not None:
            assert sc2.stop() == 0, sc2.log()[-3000:]


def _assignments_since(tmp: Path, name: str, t0: float) -> dict[int, list[int]]:
    """Per handler of the fleet, by serial: how many partitions it was handed in each
    rebalance it took part in from ``t0`` on (its log says ``assigned [...]`` each time)."""
    out: dict[int, list[int]] = {}
    line = re.compile(r"^(\S+ \S+) INFO ingest\.handler\.service: assigned \[([^\]]*)\]", re.M)
    for f in (tmp / "scaler" / "logs").glob(f"handler-{name}-*.log"):
        out[int(f.stem.rsplit("-", 1)[1])] = [
            len(parts.split(",")) if parts.strip() else 0
            for stamp, parts in line.findall(f.read_text(errors="replace"))
            if datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() >= t0
        ]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("topics", [6], indirect=True)
async def test_each_rollout_step_joins_the_new_handler_before_the_old_one_leaves(
    topics: TopicSet, redis_url: str, tmp_path: Path
) -> None:
    """A fleet pinned at three is replaced during a replay. For the canary's start and each
    promotion step the new handler joins before the old one is stopped, so the group never
    runs a handler short: no generation gives anyone more than 6/3 partitions (stopping
    first gives two handlers three each). Told beforehand, the old one leaves in the
    rebalance the new one's join opened instead of rejoining it: one rebalance a change."""
    name = f"s{os.getpid()}{int(time.time()) % 100000}"
    sc = ScalerProc(
        topics, redis_url, tmp_path, "--name", name, "--min-handlers", "3",
        "--max-handlers", "3", "--calendar", "none",
    )  # fmt: skip
    rp = None
    try:
        await asyncio.to_thread(sc.wait_for, "tickscale_scaler_group_members",
                                lambda v: v == 3, 60)  # fmt: skip
        manifest = tmp_path / "manifest.json"
        rp = start_replay(topics, manifest, tmp_path / "replay.log", "--symbols", "20",
                          "--from", "09:30", "--to", "10:15", "--speed", "30")  # fmt: skip
        await asyncio.sleep(5)  # the fleet's own start settles first
        t0 = time.time()
        good = await asyncio.to_thread(
            _rollout, topics, redis_url, name, "--command", GOOD, "--version", "v2",
            "--guard", GUARD,
        )  # fmt: skip
        assert good.returncode == 0, good.stdout + good.stderr + sc.log()[-3000:]
        assert _fleet(tmp_path, name) == ["v2", "v2", "v2"]
        await asyncio.sleep(5)  # the last new handler is handed its partitions
        seen = _assignments_since(tmp_path, name, t0)
        assert sorted(seen) == [1, 2, 3, 4, 5, 6], seen
        assert max(n for sizes in seen.values() for n in sizes) <= 2, (seen, sc.log()[-4000:])
        handovers = re.findall(r"handover \((canary|step)\): in the rebalance", sc.log())
        late = re.findall(r"handover \((canary|step)\): late", sc.log())
        assert len(handovers) + len(late) == 3, sc.log()[-4000:]
        # Handlers 1-3 ran the old version (3 made way for the canary, 2 went at the first
        # step, 1 at the second); 4 is the canary, 5 and 6 came with the two steps. One
        # rebalance a change gives {1: 2, 2: 1, 3: 0, 4: 3, 5: 2, 6: 1}.
        counts = {k: len(v) for k, v in sorted(seen.items())}
        print(f"rebalances each handler took part in: {counts}; stopped in the join: "
              f"{len(handovers)} of 3")  # fmt: skip
        assert counts == {1: 2, 2: 1, 3: 0, 4: 3, 5: 2, 6: 1}, (counts, sc.log()[-4000:])
        assert len(handovers) == 3, sc.log()[-4000:]
        assert await asyncio.to_thread(rp.wait, 300) == 0
        assert await _verify_ticks(topics, manifest) == {
            "missing": 0, "duplicated": 0, "reordered": 0, "checksum_mismatch": 0,
        }  # fmt: skip
    finally:
        if rp is not None and rp.poll() is None:
            rp.kill()
        assert sc.stop() == 0, sc.log()[-3000:]


@pytest.mark.parametrize("topics", [2], indirect=True)
async def test_a_handler_that_never_joins_does_not_cost_the_one_it_replaces(
    topics: TopicSet, tmp_path: Path
) -> None:
    """The new process runs but never joins the group (a broken version): past join_s the
    old one is left running; a new one that exits gives the step up at once."""
    spec = HandlerSpec(topics.bootstrap, topics.raw, topics.ticks, topics.deadletter,
                       topics.group, None)  # fmt: skip
    backend = ProcessBackend(spec, base_port=free_port(), state_dir=tmp_path, stop_grace_s=5)
    await backend.start()
    mute = HandlerVersion("mute", command=(sys.executable, "-c", "import time; time.sleep(60)"))
    try:
        old = await backend.add(1, mute)
        new = await backend.add(1, mute)
        async with LagProbe(topics.bootstrap, topics.raw, topics.group) as probe:
            ho = Handover(backend, probe)
            p = Pending(new, old, time.time())
            out = None
            deadline = time.monotonic() + 30
            while out is None:
                assert time.monotonic() < deadline
                out = await ho.advance(p, await backend.list(), join_s=2)
                await asyncio.sleep(0.2)
            assert out == Outcome(False, "the new handler did not join within 2s")
            assert {i.id for i in await backend.list()} == set(old + new)
            await backend.remove_ids(new)
            again = await ho.advance(Pending(new, old, time.time()), await backend.list(), 60)
            assert again == Outcome(False, "the new handler exited before it joined")
            assert [i.id for i in await backend.list()] == old
    finally:
        await backend.remove(len(await backend.list()))


def test_the_gate_admits_the_rollout_images_it_is_given_and_no_other() -> None:
    from tickscale.gate.policy import Allow, Policy, Refuse
    from tickscale.gate.settings import GateSettings

    gate = Policy(GateSettings(image="tickscale:dev", rollout_images=" tickscale:v2,"))
    assert gate.s.images == {"tickscale:dev", "tickscale:v2"}
    labels = {"io.tickscale.role": "handler", "io.tickscale.scaler": "default"}

    def create(image: str) -> object:
        body = json.dumps({"Image": image, "Labels": labels}).encode()
        return gate.decide("POST", "/containers/create", body)

    assert create("tickscale:v2") == Allow() and create("tickscale:dev") == Allow()
    other = create("tickscale:v3")
    assert isinstance(other, Refuse) and "'tickscale:v3' is not one of" in other.reason
    assert gate.decide("GET", "/v1.41/images/tickscale:v2/json", b"") == Allow()
    assert isinstance(gate.decide("GET", "/images/tickscale:v3/json", b""), Refuse)
    plain = Policy(GateSettings(image="tickscale:dev"))
    assert isinstance(plain.decide("GET", "/images/tickscale:v2/json", b""), Refuse)


def test_loadtest_rollout_specs() -> None:
    from tickscale.loadtest.rollout_drill import parse_rollout

    local = parse_rollout(f"{GOOD}@30", "local")
    assert local.at_s == 30 and local.version.command == tuple(shlex.split(GOOD))
    assert local.version.name.startswith("cmd-") and local.version.image is None
    image = parse_rollout("registry.local:5000/tickscale:v2@1.5m", "compose")
    assert (image.version.image, image.at_s) == ("registry.local:5000/tickscale:v2", 90.0)
    for bad in ("tickscale:v2", "tickscale:v2@soon", "@30"):
        with pytest.raises(ValueError):
            parse_rollout(bad, "compose")


@pytest.mark.slow
def test_loadtest_runs_a_rollout_mid_replay_and_reports_it(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    res_path = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "tickscale", "loadtest", "--no-progress",
           "--bootstrap", kafka_bootstrap, "--redis", redis_url, "--scenario", "open",
           "--from", "09:29", "--to", "09:40", "--speed", "10", "--symbols", "20",
           "--partitions", "4", "--policy", "fixed:2", "--rollout", f"{GOOD}@5",
           "--rollout-guard", GUARD, "--slo-p99", "0", "--slo-max", "0", "--slo-lag-p99", "0",
           "--slo-lag-max", "0", "--slo-recovery", "0",
           "--out", str(tmp_path / "run"), "--json", str(res_path)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-5000:]
    r = json.loads(res_path.read_text())
    assert r["ledger_ok"] and (r["missing"], r["duplicated"], r["reordered"]) == (0, 0, 0), r
    ro = r["rollout"]
    assert ro["outcome"] == "promoted", ro
    assert [s["event"] for s in ro["steps"]][:3] == ["canary", "window", "passed"], ro
    said = " ".join(p.stderr.split())  # the console wraps long lines
    assert "rollout of cmd-" in said and "at +5s: promoted (" in said, said[-3000:]
