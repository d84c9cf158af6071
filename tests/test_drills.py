"""The chaos drills' mechanics against real processes: each kind really kills, pauses or
restarts the process it names, on the same port and data; their options and defaults.

The end-to-end drill (a load test on the ``open`` scenario) is at the end, marked slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from tickscale.loadtest.chaos import (
    KINDS,
    ChaosContext,
    ChaosEvent,
    check_allowed,
    check_options,
    parse_chaos,
    perform,
    run_all,
)
from tickscale.loadtest.procs import handler_pids, process_state
from tickscale.loadtest.stack import LocalRedis, ScalerChild
from tickscale.localstack import KafkaBroker, delete_topics, ensure_topics


def test_kinds_defaults_and_parsing() -> None:
    assert set(KINDS) >= {"kill-scaler", "broker-kill", "broker-pause", "redis-kill"}
    # docs/loadtest.md's promise: a broker restart stays down a minute unless told otherwise.
    assert parse_chaos("broker-restart@20").duration_s == 60.0
    assert parse_chaos("broker-restart@20:10").duration_s == 10.0
    for kind in ("kill-scaler", "broker-kill", "broker-pause", "redis-kill"):
        s = parse_chaos(f"{kind}@1m")
        assert (s.kind, s.at_s, s.duration_s) == (kind, 60.0, 10.0)
    assert str(parse_chaos("broker-pause@5:3")) == "broker-pause@5:3"
    with pytest.raises(ValueError, match="unknown chaos"):
        parse_chaos("broker-explode@3")


def test_drills_only_on_services_the_run_started() -> None:
    for kind in ("broker-kill", "broker-pause", "broker-restart"):
        with pytest.raises(ValueError, match="--bootstrap"):
            check_options([parse_chaos(f"{kind}@5")], "local", "127.0.0.1:9092", None, "fixed:2")
        with pytest.raises(ValueError, match="--bootstrap"):
            check_options([parse_chaos(f"{kind}@5")], "compose", None, None, "fixed:2")
    for kind in ("redis-kill", "redis-stop"):
        with pytest.raises(ValueError, match="--redis"):
            check_options([parse_chaos(f"{kind}@5")], "local", None, "redis://x", "fixed:2")
    # Two at once on different services is the point; two on one service would collide.
    pair = [parse_chaos("broker-kill@6:5"), parse_chaos("kill-handler@8")]
    check_allowed(pair, True, True, "fixed:2")
    check_allowed([parse_chaos("kill-scaler@5:10"), parse_chaos("redis-kill@6")], True, True, "x")
    with pytest.raises(ValueError, match="overlap on the broker"):
        check_allowed([parse_chaos("broker-kill@6:5"), parse_chaos("broker-pause@10")],
                      True, True, "fixed:2")  # fmt: skip
    check_allowed([parse_chaos("broker-kill@6:5"), parse_chaos("broker-pause@16")],
                  True, True, "fixed:2")  # fmt: skip


async def _one(kind: str, ctx: ChaosContext, duration: float) -> ChaosEvent:
    ev = ChaosEvent(kind, 0.0, duration)
    await perform(parse_chaos(f"{kind}@0:{duration:g}"), ctx, ev)
    return ev


async def _read_all(bootstrap: str, topic: str) -> list[bytes]:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                         auto_offset_reset="earliest")  # fmt: skip
    await c.start()
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        out: list[bytes] = []
        end = (await c.end_offsets([tp]))[tp]
        while len(out) < end:
            batch = await c.getmany(tp, timeout_ms=2000)
            out += [r.value for r in batch.get(tp, []) if r.value is not None]
        return out
    finally:
        await c.stop()


async def test_broker_pause_stops_and_resumes_the_same_process(kafka_broker: KafkaBroker) -> None:
    ctx = ChaosContext(scaler=None, broker=kafka_broker, redis=None, policy="fixed:2")
    pid = kafka_broker.pid
    assert pid is not None and process_state(pid) in ("S", "R")
    task = asyncio.create_task(_one("broker-pause", ctx, 3.0))
    await asyncio.sleep(1.0)
    try:
        # Stopped by the kernel: a hung broker, its sockets open, nothing answering.
        assert process_state(pid) == "T"
    finally:
        ev = await task
    assert ev.ok, ev.detail
    assert process_state(pid) in ("S", "R") and kafka_broker.pid == pid
    assert ev.end_wall - ev.wall >= 3.0 and "SIGSTOP" in ev.detail


@pytest.mark.slow
async def test_broker_kill_crashes_and_restarts_on_the_same_port_and_data(
    kafka_broker: KafkaBroker,
) -> None:
    topic = f"t-drill-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_broker.bootstrap, {topic: 1})
    p = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    await p.start()
    try:
        await p.send_and_wait(topic, b"before the crash")
    finally:
        await p.stop()
    old_proc = kafka_broker._proc
    assert old_proc is not None
    bootstrap = kafka_broker.bootstrap
    ctx = ChaosContext(scaler=None, broker=kafka_broker, redis=None, policy="fixed:2")
    ev = await _one("broker-kill", ctx, 1.0)
    assert ev.ok, ev.detail
    # SIGKILL, not a controlled shutdown; then a new process on the same port.
    assert old_proc.returncode == -signal.SIGKILL
    assert ev.extra["pid"] == old_proc.pid and ev.extra["new_pid"] == kafka_broker.pid
    assert kafka_broker.pid != old_proc.pid and kafka_broker.running
    assert kafka_broker.bootstrap == bootstrap
    assert await _read_all(bootstrap, topic) == [b"before the crash"]  # same data
    with contextlib.suppress(Exception):
        await delete_topics(bootstrap, [topic])


@pytest.mark.slow
async def test_broker_restart_is_a_controlled_stop(kafka_broker: KafkaBroker) -> None:
    old_proc = kafka_broker._proc
    assert old_proc is not None
    ctx = ChaosContext(scaler=None, broker=kafka_broker, redis=None, policy="fixed:2")
    ev = await _one("broker-restart", ctx, 0.5)
    assert ev.ok, ev.detail
    assert old_proc.returncode != -signal.SIGKILL  # SIGTERM: the broker shut itself down
    assert kafka_broker.running and kafka_broker.pid != old_proc.pid


async def test_redis_kill_crashes_and_restarts_empty_on_the_same_port(tmp_path: Path) -> None:
    rs = LocalRedis(work_dir=tmp_path / "redis")
    rs.start()
    try:
        r = redis.Redis.from_url(rs.url)
        r.set("k", "v")
        old_proc = rs._proc
        assert old_proc is not None
        ctx = ChaosContext(scaler=None, broker=None, redis=rs, policy="fixed:2")
        ev = await _one("redis-kill", ctx, 1.0)
        assert ev.ok, ev.detail
        assert old_proc.returncode == -signal.SIGKILL
        assert rs.pid is not None and rs.pid != old_proc.pid == ev.extra["pid"]
        assert r.ping() and r.get("k") is None  # same port, no persistence
        r.close()
    finally:
        rs.close()


def _fake_handler(fleet: str, n: int, log: Path) -> subprocess.Popen[bytes]:
    """A process that looks like one of the fleet's handlers where the drills look: its
    command line and its handler id. It does nothing else."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "tickscale", "handler"],
        env=os.environ | {"TICKSCALE_HANDLER_HANDLER_ID": f"handler-{fleet}-{n}"},
        stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


async def test_kill_scaler_kills_and_restarts_the_same_command(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    cmd = [sys.executable, "-c",
           f"import os, time; open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n'); "
           "time.sleep(600)"]  # fmt: skip
    scaler = ScalerChild(cmd, dict(os.environ), tmp_path / "scaler.log")
    fleet = f"lt-test-{uuid.uuid4().hex[:6]}"
    handler = _fake_handler(fleet, 1, tmp_path / "h.log")
    try:
        deadline = time.monotonic() + 30
        while not pids.exists() or handler_pids(fleet) != [handler.pid]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        first = scaler.proc
        ctx = ChaosContext(scaler=scaler, broker=None, redis=None, policy="fixed:2", fleet=fleet)
        ev = await _one("kill-scaler", ctx, 1.5)
        assert ev.ok, ev.detail
        assert first.returncode == -signal.SIGKILL
        assert scaler.alive() and scaler.pid != first.pid and scaler.restarts == 1
        assert (ev.extra["pid"], ev.extra["new_pid"]) == (first.pid, scaler.pid)
        # The handler, in its own session, was not touched, and the drill saw it survive.
        assert ev.extra["handlers_at_kill"] == ev.extra["handlers_alive_at_restart"] == 1
        deadline = time.monotonic() + 30
        while len(pids.read_text().split()) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert pids.read_text().split() == [str(first.pid), str(scaler.pid)]
    finally:
        scaler.stop(timeout=5)
        handler.kill()
        handler.wait()


async def test_kill_handler_kills_the_oldest_of_the_fleet_only(tmp_path: Path) -> None:
    fleet = f"lt-test-{uuid.uuid4().hex[:6]}"
    other = f"lt-other-{uuid.uuid4().hex[:6]}"
    procs = [_fake_handler(fleet, 1, tmp_path / "a.log")]
    await asyncio.sleep(0.05)  # distinct start times
    procs += [
        _fake_handler(fleet, 2, tmp_path / "b.log"),
        _fake_handler(other, 1, tmp_path / "c.log"),
    ]
    try:
        deadline = time.monotonic() + 30
        while len(handler_pids(fleet)) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert handler_pids(fleet) == [procs[0].pid, procs[1].pid]
        ctx = ChaosContext(scaler=None, broker=None, redis=None, policy="fixed:2", fleet=fleet)
        ev = await _one("kill-handler", ctx, 0.0)
        assert ev.ok and ev.extra["pid"] == procs[0].pid, ev.detail
        assert procs[0].wait(10) == -signal.SIGKILL
        assert procs[1].poll() is None and procs[2].poll() is None
        assert handler_pids(fleet) == [procs[1].pid]
        # No handler left to kill: the drill fails and says so, it does not raise.
        procs[1].kill()
        procs[1].wait()
        ev = await _one("kill-handler", ctx, 0.0)
        assert not ev.ok and "no handler" in ev.detail
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


async def test_a_run_cut_short_resumes_a_paused_broker(kafka_broker: KafkaBroker) -> None:
    ctx = ChaosContext(scaler=None, broker=kafka_broker, redis=None, policy="fixed:2")
    pid = kafka_broker.pid
    assert pid is not None
    events: list[ChaosEvent] = []
    task = asyncio.create_task(
        run_all([parse_chaos("broker-pause@0:60")], ctx, time.time(), events=events)
    )
    await asyncio.sleep(1.0)
    assert process_state(pid) == "T" and events[0].wall > 0 and not events[0].end_wall
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert process_state(pid) in ("S", "R")
    assert "cut short" in events[0].detail and events[0].end_wall > 0


@pytest.mark.slow
def test_open_with_redis_killed_and_a_handler_killed_at_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Two drills at once on the ``open`` scenario, Redis started by the run: exact ledger,
    lag back under the target after each fault's end, counts from real processes."""
    res_path = tmp_path / "result.json"
    env = os.environ | {"TICKSCALE_HANDLER_SESSION_TIMEOUT_MS": "6000"}
    p = subprocess.run(
        [sys.executable, "-m", "tickscale", "loadtest", "--no-progress",
         "--bootstrap", kafka_bootstrap, "--scenario", "open", "--from", "09:29", "--to", "09:33",
         "--speed", "10", "--symbols", "12", "--seed", "3", "--date", "2024-11-25",
         "--partitions", "4", "--policy", "fixed:2",
         "--chaos", "redis-kill@5:5", "--chaos", "kill-handler@7",
         "--slo-p50", "0", "--slo-p99", "0", "--slo-max", "0", "--slo-lag-p99", "0",
         "--slo-lag-max", "0", "--slo-recovery", "60",
         "--out", str(tmp_path / "run"), "--json", str(res_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-5000:]
    r = orjson.loads(res_path.read_bytes())
    assert r["ok"] and r["drained"], r
    assert (r["missing"], r["duplicated"], r["reordered"], r["checksum_mismatch"]) == (0, 0, 0, 0)
    assert r["ticks_read"] == r["ticks_expected"] > 1000
    kinds = {e["kind"]: e for e in r["chaos"]}
    assert set(kinds) == {"redis-kill", "kill-handler"} and all(e["ok"] for e in r["chaos"])
    rk = kinds["redis-kill"]
    assert rk["extra"]["new_pid"] != rk["extra"]["pid"]
    assert not Path(f"/proc/{kinds['kill-handler']['extra']['pid']}/cmdline").exists()
    # Recovery counts from each fault's end: Redis back, the handler dead.
    recs = {x["label"]: x for x in r["recoveries"]}
    redis_back = next(x for label, x in recs.items() if label.startswith("redis-kill end"))
    assert redis_back["wall"] == pytest.approx(rk["end_wall"], abs=0.01)
    assert all(x["recovery_s"] is not None and x["recovery_s"] <= 60 for x in recs.values())
    # Handler-seconds count live processes, member-seconds the group, where the killed
    # handler stays a member until the broker's session timeout (6 s here) drops it, beside
    # its replacement: both above zero, member-seconds within that much of the fixed fleet.
    assert r["handler_seconds_source"].startswith("live handler processes")
    assert r["handler_seconds"] > 0
    assert 0 < r["member_seconds"] <= r["fixed_peak_handler_seconds"] + 6.0 + 1.0
    assert 0 < r["handler_seconds"] <= r["fixed_peak_handler_seconds"] * 1.01
