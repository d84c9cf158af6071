"""The scaler against the real broker and Redis: lag, scaling with the process backend,
leader failover, start-up errors."""

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
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from redis.asyncio import Redis

from core.constants import REDIS_SCALER_EVENTS, REDIS_SCALER_LEASE
from core.incarnation import offset_metadata, topic_id
from scaler.audit import read_events
from scaler.lag import LagProbe
from tests.pipeline_utils import readyz, run_verify, start_replay, summary
from tickscale.localstack import consumer_groups_describe, delete_topics, ensure_topics
from tickscale.localstack.net import free_port
from tickscale.localstack.redis import RedisServer
from tickscale.localstack.topics import TopicSet


async def _fill_raw(topics: TopicSet) -> None:
    """100 records on each of md.raw's 4 partitions."""
    prod = AIOKafkaProducer(bootstrap_servers=topics.bootstrap)
    await prod.start()
    try:
        for i in range(400):
            await prod.send(topics.raw, b"x" * 10, partition=i % 4)
        await prod.flush()
    finally:
        await prod.stop()


async def test_lag_matches_kafkas_own_consumer_groups_tool(topics: TopicSet) -> None:
    await _fill_raw(topics)
    # Commit different positions on three partitions; leave partition 3 uncommitted.
    c = AIOKafkaConsumer(bootstrap_servers=topics.bootstrap, group_id=topics.group,
                         enable_auto_commit=False)  # fmt: skip
    await c.start()
    try:
        c.assign([TopicPartition(topics.raw, p) for p in range(4)])
        await c.commit({
            TopicPartition(topics.raw, 0): OffsetAndMetadata(100, ""),
            TopicPartition(topics.raw, 1): OffsetAndMetadata(37, ""),
            TopicPartition(topics.raw, 2): OffsetAndMetadata(0, ""),
        })  # fmt: skip
    finally:
        await c.stop()

    async with LagProbe(topics.bootstrap, topics.raw, topics.group) as probe:
        snap = await probe.measure()
    ours = {p.partition: p for p in snap.partitions}
    tool = await asyncio.to_thread(consumer_groups_describe, topics.bootstrap, topics.group)
    rows = {r["partition"]: r for r in tool if r["topic"] == topics.raw}
    assert set(rows) >= {0, 1, 2}, tool
    for p, r in rows.items():
        assert ours[p].end_offset == r["log_end_offset"], (p, r)
        if r["current_offset"] is not None:
            assert ours[p].committed == r["current_offset"]
            assert ours[p].lag == r["lag"], (p, r, ours[p])
    assert [ours[p].lag for p in range(4)] == [0, 63, 100, 100]
    assert ours[3].committed is None  # counted from the log start
    assert snap.lag_msgs == 263
    # Records were produced moments ago: the oldest unprocessed is young but not zero.
    assert 0 < snap.lag_s < 120
    assert snap.group_state == "Empty" and snap.members == 0


async def test_lag_ignores_offsets_committed_for_another_incarnation(
    topics: TopicSet, caplog: pytest.LogCaptureFixture
) -> None:
    """Offsets the group committed for a deleted topic of the same name (a late commit of
    the old day) are not this log's: the handlers start such partitions from the log
    start, so that is where the backlog the scaler sizes the fleet for begins."""
    await _fill_raw(topics)
    c = AIOKafkaConsumer(bootstrap_servers=topics.bootstrap, group_id=topics.group,
                         enable_auto_commit=False)  # fmt: skip
    await c.start()
    try:
        this_id = await topic_id(c, topics.raw)
        assert this_id
        c.assign([TopicPartition(topics.raw, p) for p in range(4)])
        await c.commit({
            # This incarnation's own commit: trusted.
            TopicPartition(topics.raw, 0): OffsetAndMetadata(
                60, offset_metadata("tickscale.g.h1", this_id)),
            # Stamped with an earlier incarnation's id, within this log.
            TopicPartition(topics.raw, 1): OffsetAndMetadata(
                40, offset_metadata("tickscale.g.h1", "EARLIER-ID")),
            # Unstamped, beyond this log's end: an earlier, longer day's.
            TopicPartition(topics.raw, 2): OffsetAndMetadata(5_000, "tickscale.g.h1"),
            # Unstamped, within the log: nothing tells it apart, so it is trusted.
            TopicPartition(topics.raw, 3): OffsetAndMetadata(90, "tickscale.g.h1"),
        })  # fmt: skip
    finally:
        await c.stop()

    async with LagProbe(topics.bootstrap, topics.raw, topics.group) as probe:
        snap = await probe.measure()
        again = await probe.measure()
    ours = {p.partition: p for p in snap.partitions}
    assert [ours[p].lag for p in range(4)] == [40, 100, 100, 10]
    assert [ours[p].committed for p in range(4)] == [60, None, None, 90]
    assert snap.lag_msgs == again.lag_msgs == 250
    said = [r.getMessage() for r in caplog.records if "earlier incarnation" in r.getMessage()]
    # Said once per partition, not at every poll.
    assert len(said) == 2, said
    assert any(f"{topics.raw}-1" in m and "EARLIER-ID" in m for m in said), said
    assert any(f"{topics.raw}-2" in m and "beyond the log end 100" in m for m in said), said


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def _lease_taken(redis_url: str, name: str) -> bool:
    """Whether fleet ``name``'s leader lease is held in Redis."""

    async def exists() -> int:
        r = Redis.from_url(redis_url)
        try:
            return int(await r.exists(f"{REDIS_SCALER_LEASE}:{name}"))
        finally:
            await r.aclose()

    return asyncio.run(exists()) == 1


class ScalerProc:
    def __init__(self, ts: TopicSet, redis_url: str, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.log_path = tmp / f"scaler-{self.port}.log"
        cmd = [
            sys.executable, "-m", "tickscale", "scaler",
            "--backend", "process", "--bootstrap", ts.bootstrap, "--redis-url", redis_url,
            "--topic", ts.raw, "--group", ts.group, "--metrics-port", str(self.port),
            "--state-dir", str(tmp / "scaler"), "--handler-base-port", str(free_port()),
            "--poll", "0.5", *args,
        ]  # fmt: skip
        env = os.environ | {
            "TICKSCALE_SCALER_OUT_TOPIC": ts.ticks,
            "TICKSCALE_SCALER_DEADLETTER_TOPIC": ts.deadletter,
        }
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def metrics(self) -> str:
        return _scrape(self.port)

    def value(self, name: str) -> float | None:
        try:
            return _metric(self.metrics(), name)
        except OSError:
            return None

    def wait_for(self, name: str, pred: object, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        v = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            v = self.value(name)
            if v is not None and pred(v):  # type: ignore[operator]
                return v
            time.sleep(0.5)
        raise AssertionError(f"{name}={v} after {timeout}s\n{self.log()[-4000:]}")

    def log(self) -> str:
        if not self._log.closed:  # still readable after stop()
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc


@pytest.mark.slow
@pytest.mark.parametrize("topics", [6], indirect=True)
async def test_scales_up_on_lag_and_down_when_drained_without_losing_a_tick(
    topics: TopicSet, redis_url: str, tmp_path: Path
) -> None:
    """A replayed burst builds lag; the scaler adds handlers, then removes them when
    it has drained. Removal is SIGTERM with drain: the ledger must be exact."""
    name = f"t{os.getpid()}{int(time.time()) % 100000}"
    sc = ScalerProc(
        topics, redis_url, tmp_path,
        "--name", name, "--min-handlers", "1", "--max-handlers", "3", "--calendar", "none",
        "--lag-target", "2", "--scale-down-window", "8", "--settle", "2",
    )  # fmt: skip
    try:
        await asyncio.to_thread(sc.wait_for, "tickscale_scaler_running_handlers", lambda v: v >= 1,
                                60)  # fmt: skip
        manifest = tmp_path / "manifest.json"
        rp = start_replay(topics, manifest, tmp_path / "replay.log", "--symbols", "20",
                          "--from", "09:29", "--to", "09:36", "--speed", "max")  # fmt: skip
        await asyncio.to_thread(sc.wait_for, "tickscale_scaler_running_handlers", lambda v: v >= 2,
                                120)  # fmt: skip
        assert await asyncio.to_thread(rp.wait, 300) == 0
        # Drained, then back to the minimum after the stabilisation window.
        await asyncio.to_thread(sc.wait_for, "tickscale_scaler_running_handlers", lambda v: v == 1,
                                180)  # fmt: skip
        rc, out = await asyncio.to_thread(run_verify, topics, manifest, 120)
        assert rc == 0, out[-3000:]
        assert summary(out) == {"missing": 0, "duplicated": 0, "reordered": 0,
                                "checksum_mismatch": 0}  # fmt: skip
        r = Redis.from_url(redis_url)
        try:
            events = await read_events(r, f"{REDIS_SCALER_EVENTS}:{name}")
        finally:
            await r.aclose()
        ups = [e for e in events if e["to"] > e["from"]]
        downs = [e for e in events if e["to"] < e["from"]]
        assert ups and downs, events
        assert any(e["signal"] in ("lag", "rate") for e in ups if e["from"] >= 1), ups
        assert all(e["result"]["ok"] for e in events), events
        assert "explanation" in events[0] and events[0]["inputs"]["partitions"] == 6
    finally:
        # SIGHUP, as from a closed terminal: the same orderly stop as SIGTERM.
        assert sc.stop(signal.SIGHUP) == 0, sc.log()[-3000:]
    # The scaler's handlers stop with it (process backend).
    assert not (tmp_path / "scaler" / "targets.json").read_text().strip("[] \n")


@pytest.mark.slow
async def test_leader_failover(topics: TopicSet, redis_url: str, tmp_path: Path) -> None:
    """Two scalers, one lease: exactly one leads; kill it and the other takes over."""
    name = f"ha{os.getpid()}{int(time.time()) % 100000}"
    args = ("--name", name, "--dry-run", "--calendar", "none", "--lease-ttl", "3")
    a = ScalerProc(topics, redis_url, tmp_path, *args, "--id", "scaler-a")
    b = ScalerProc(topics, redis_url, tmp_path, *args, "--id", "scaler-b")
    try:
        for s in (a, b):
            await asyncio.to_thread(s.wait_for, "tickscale_scaler_leader", lambda v: v >= 0, 60)
        await asyncio.sleep(2)
        leaders = [s for s in (a, b) if s.value("tickscale_scaler_leader") == 1]
        assert len(leaders) == 1, (a.value("tickscale_scaler_leader"),
                                   b.value("tickscale_scaler_leader"))  # fmt: skip
        leader = leaders[0]
        follower = b if leader is a else a
        # Dry run: the leader wants its minimum (1) but starts nothing.
        text = leader.metrics()
        assert _metric(text, "tickscale_scaler_desired_handlers") == 1
        assert _metric(text, "tickscale_scaler_running_handlers") == 0
        assert _metric(text, "tickscale_scaler_dry_run") == 1
        leader.stop(signal.SIGKILL)  # no release: the lease must expire
        t0 = time.monotonic()
        await asyncio.to_thread(follower.wait_for, "tickscale_scaler_leader", lambda v: v == 1, 15)
        took = time.monotonic() - t0
        assert took < 3 + 2 + 1.5  # TTL + renew period + polls
    finally:
        for s in (a, b):
            if s.proc.poll() is None:
                s.stop()


@pytest.mark.slow
@pytest.mark.parametrize("topics", [2], indirect=True)
async def test_standby_leaves_the_leaders_targets_alone(
    topics: TopicSet, redis_url: str, tmp_path: Path
) -> None:
    """A standby shares its leader's state directory: starting and stopping it must not
    empty the Prometheus targets file that lists the leader's handlers."""
    name = f"sb{os.getpid()}{int(time.time()) % 100000}"
    args = ("--name", name, "--min-handlers", "1", "--max-handlers", "1", "--calendar", "none")
    targets = tmp_path / "scaler" / "targets.json"
    leader = ScalerProc(topics, redis_url, tmp_path, *args, "--id", "scaler-a")
    standby: ScalerProc | None = None
    try:
        await asyncio.to_thread(leader.wait_for, "tickscale_scaler_running_handlers",
                                lambda v: v >= 1, 60)  # fmt: skip
        fleet = json.loads(targets.read_text())
        assert len(fleet) == 1, fleet
        standby = ScalerProc(topics, redis_url, tmp_path, *args, "--id", "scaler-b")
        await asyncio.to_thread(standby.wait_for, "tickscale_scaler_leader", lambda v: v == 0, 60)
        assert json.loads(targets.read_text()) == fleet
        assert standby.stop() == 0, standby.log()[-3000:]
        assert json.loads(targets.read_text()) == fleet
        assert leader.value("tickscale_scaler_leader") == 1
    finally:
        for s in (standby, leader):
            if s is not None and s.proc.poll() is None:
                s.stop()
    assert json.loads(targets.read_text()) == []  # the leader stopped its handler


def test_bad_settings_fail_at_start_naming_them(
    redis_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tickscale", "scaler", "--state-dir", str(tmp_path), *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    r = run("--min-handlers", "4", "--max-handlers", "2")
    assert r.returncode == 2 and "--min-handlers" in r.stderr, r.stderr
    r = run("--calendar", "XMOON")
    assert r.returncode == 2 and "--calendar" in r.stderr and "XMOON" in r.stderr
    # An absent broker is waited for (with backoff), then named.
    r = run("--redis-url", redis_url, "--bootstrap", "127.0.0.1:1", "--connect-timeout", "2")
    assert r.returncode == 2 and "--bootstrap 127.0.0.1:1: no broker answered" in r.stderr
    assert "retry 1 in" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # A state folder the process backend cannot write (a file there): named before any
    # handler is started, not as a traceback at the first one.
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    r = run("--redis-url", redis_url, "--bootstrap", kafka_bootstrap, "--state-dir", str(a_file))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: invalid setting --state-dir: {a_file} is a file" in r.stderr, r.stderr
    # So is an absent Redis, with its own line.
    r = run("--redis-url", "redis://127.0.0.1:1/0", "--connect-timeout", "2")
    assert r.returncode == 2, r.stderr
    assert "error: --redis-url: no Redis answered at redis://127.0.0.1:1/0 within 2 s" in r.stderr
    assert "retry 1 in" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_metrics_address_that_cannot_be_had_is_named_before_the_lease(
    topics: TopicSet, redis_url: str, tmp_path: Path
) -> None:
    """A second scaler on this machine (the metrics port taken) or an address that is not
    this machine's: one line naming the flag, exit 2, and nothing taken on the way (the
    leader lease would make it the fleet's leader, whose exit stops its handlers)."""
    name = f"port{os.getpid()}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable, "-m", "tickscale", "scaler", "--state-dir", str(tmp_path),
                "--bootstrap", topics.bootstrap, "--redis-url", redis_url, "--topic", topics.raw,
                "--group", topics.group, "--name", name, "--calendar", "none", *args,
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def one_error(r: subprocess.CompletedProcess[str]) -> str:
        assert r.returncode == 2, r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "Unclosed" not in r.stderr, r.stderr[-3000:]
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, r.stderr[-3000:]
        return errors[0]

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_error(run("--metrics-port", str(port)))
    assert line.startswith(f"error: --metrics-port: 0.0.0.0:{port} is already in use"), line
    line = one_error(run("--metrics-host", "192.0.2.1"))
    assert line.startswith("error: --metrics-host: cannot listen on 192.0.2.1:"), line
    assert not _lease_taken(redis_url, name)


def test_a_refused_redis_password_is_named_at_once(tmp_path: Path) -> None:
    """A wrong password is the user's to fix, not an absence to wait out (redis-py words
    it as a connection error): named at once, the password not shown."""
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--requirepass", "right-one", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "tickscale", "scaler", "--state-dir", str(tmp_path),
             "--redis-url", f"redis://:wrong-one@127.0.0.1:{port}/0", "--connect-timeout", "60"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        took = time.monotonic() - t0
    finally:
        redis.terminate()
        redis.wait(10)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: --redis-url: Redis at redis://127.0.0.1:{port}/0 refused" in r.stderr
    assert "wrong-one" not in r.stderr, r.stderr
    assert took < 30, took  # not the 60 s wait for a Redis that is absent


async def test_a_scaler_started_before_its_redis_waits_for_it(
    topics: TopicSet, tmp_path: Path
) -> None:
    """A stack whose parts come up in any order: Redis arrives after the scaler, which
    waits (as for its broker) instead of exiting, and then leads."""
    redis = RedisServer(port=free_port(), work_dir=tmp_path / "redis")
    args = ("--dry-run", "--calendar", "none", "--connect-timeout", "60")
    sc = ScalerProc(topics, redis.url, tmp_path, *args, "--name", f"late{os.getpid()}")
    try:
        await asyncio.sleep(4.0)
        assert sc.proc.poll() is None, sc.log()
        await asyncio.to_thread(redis.start)
        await asyncio.to_thread(sc.wait_for, "tickscale_scaler_leader", lambda v: v == 1, 60)
        log = sc.log()
        assert f"no Redis at {redis.url} yet" in log and "Traceback" not in log, log[-3000:]
    finally:
        if sc.proc.poll() is None:
            sc.stop()
        redis.stop()


def _wait(pred: Callable[[], bool], timeout: float, what: str, sc: ScalerProc) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert sc.proc.poll() is None, sc.log()[-3000:]
        assert time.monotonic() < deadline, f"{what} after {timeout}s\n{sc.log()[-3000:]}"
        time.sleep(0.5)


def _poll_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if " poll failed" in ln or "poll still failing" in ln]


async def test_a_raw_topic_gone_is_said_once_and_the_scaler_turns_not_ready(
    topics: TopicSet, redis_url: str, tmp_path: Path
) -> None:
    """The raw topic deleted under a running scaler: each poll fails (every 0.5 s here).
    That is said once, not per poll; /readyz turns 503 once its figures are stale, so
    nothing reads them as current; the topic back, it says so and is ready again."""
    args = ("--dry-run", "--calendar", "none", "--name", f"gone{os.getpid()}")
    sc = ScalerProc(topics, redis_url, tmp_path, *args)
    try:
        await asyncio.to_thread(_wait, lambda: readyz(sc.port) == 200, 60, "not ready", sc)
        before = len(sc.log())
        t0 = time.monotonic()  # its last good poll is about one poll before this
        await delete_topics(topics.bootstrap, [topics.raw])
        await asyncio.to_thread(
            _wait, lambda: readyz(sc.port) == 503, 30, "still ready without the topic", sc
        )
        # Not at the first failed poll: once its figures are 10 s old (less a slow poll).
        assert time.monotonic() - t0 >= 5, "not ready before its figures were stale"
        failures = await asyncio.to_thread(
            sc.wait_for, "tickscale_scaler_poll_failures_total", lambda v: v >= 20, 30
        )
        lines = _poll_lines(sc.log()[before:])
        # One line; two if a poll under way when the topic went failed another way first.
        assert 1 <= len(lines) <= 2, f"{failures} failed polls said {len(lines)} times: {lines}"
        gone = f"poll failed: KafkaError: topic '{topics.raw}' has no partitions"
        assert sum(gone in ln for ln in lines) == 1, lines

        await ensure_topics(topics.bootstrap, {topics.raw: topics.raw_partitions})
        await asyncio.to_thread(
            _wait, lambda: readyz(sc.port) == 200, 30, "not ready with the topic back", sc
        )
        await asyncio.to_thread(
            _wait, lambda: "poll succeeds again, after" in sc.log(), 10, "no recovery line", sc
        )
        assert _poll_lines(sc.log()[before:]) == lines  # nothing failed since
    finally:
        if sc.proc.poll() is None:
            sc.stop()


@pytest.mark.slow
async def test_redis_lost_under_a_running_scaler_holds_the_fleet_and_says_so_once(
    topics: TopicSet, tmp_path: Path
) -> None:
    """Redis stops under the leading scaler: it cannot renew its lease or read the
    handlers' capacity, so it holds the fleet, says so once, not at each poll, and leads
    again when Redis is back."""
    redis = RedisServer(port=free_port(), work_dir=tmp_path / "redis")
    redis.start()
    args = ("--dry-run", "--calendar", "none", "--name", f"rl{os.getpid()}")
    sc = ScalerProc(topics, redis.url, tmp_path, *args)
    try:
        await asyncio.to_thread(sc.wait_for, "tickscale_scaler_leader", lambda v: v == 1, 60)
        before = len(sc.log())
        redis.stop()
        t0 = time.monotonic()
        await asyncio.to_thread(sc.wait_for, "tickscale_scaler_leader", lambda v: v == 0, 30)
        # Some 25 polls and 7 lease attempts, each failing at Redis.
        await asyncio.sleep(max(0.0, 12 - (time.monotonic() - t0)))
        log = sc.log()[before:]
        # The lease and the handlers' stats each say it once (the poll goes on).
        lines = [ln for ln in log.splitlines() if " failed: " in ln or "still failing" in ln]
        assert len(lines) == 2, lines
        assert any("leader lease failed: ConnectionError: Error 111" in ln for ln in lines), lines
        assert any("Redis failed: ConnectionError: Error 111" in ln for ln in lines), lines
        assert "Traceback" not in log

        redis.start()
        await asyncio.to_thread(sc.wait_for, "tickscale_scaler_leader", lambda v: v == 1, 60)
        log = sc.log()[before:]
        assert "leader lease succeeds again, after" in log, log[-3000:]
        assert "stats from Redis succeeds again, after" in log, log[-3000:]
    finally:
        if sc.proc.poll() is None:
            sc.stop()
        redis.stop()


def test_a_scaler_waits_for_its_container_engine_then_names_docker_host(
    topics: TopicSet, redis_url: str, tmp_path: Path
) -> None:
    """No engine answers at --docker-host (down, restarting, or the address mistyped): the
    scaler waits for it as for its broker and Redis, then names the flag. Nothing about the
    setting is invalid, and nothing is taken on the way."""
    sock = tmp_path / "absent.sock"
    name = f"engine{os.getpid()}"
    sc = ScalerProc(
        topics, redis_url, tmp_path, "--backend", "docker", "--docker-host", f"unix://{sock}",
        "--connect-timeout", "3", "--calendar", "none", "--name", name,
    )  # fmt: skip
    t0 = time.monotonic()
    rc = sc.proc.wait(90)
    took = time.monotonic() - t0
    assert sc.stop() == rc == 2, sc.log()[-3000:]
    text = sc.log()
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: --docker-host: no Docker engine answered at unix://{sock} within 3 s "
        "(is it running, is the address right?)"
    ], text[-3000:]
    assert f"no Docker engine at unix://{sock} yet; retry 1 in" in text, text[-3000:]
    assert "Traceback" not in text and took >= 3, (took, text[-3000:])
    assert not _lease_taken(redis_url, name)


def test_a_stop_ends_the_wait_for_the_container_engine(
    topics: TopicSet, redis_url: str, tmp_path: Path
) -> None:
    """SIGTERM while the scaler waits for its engine ends the wait and the scaler at once,
    cleanly, rather than after the whole --connect-timeout."""
    sock = tmp_path / "absent.sock"
    sc = ScalerProc(
        topics, redis_url, tmp_path, "--backend", "docker", "--docker-host", f"unix://{sock}",
        "--connect-timeout", "120", "--calendar", "none", "--name", f"stopwait{os.getpid()}",
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while "no Docker engine at" not in sc.log():
        assert sc.proc.poll() is None and time.monotonic() < deadline, sc.log()[-3000:]
        time.sleep(0.2)
    t0 = time.monotonic()
    rc = sc.stop(timeout=30)
    took = time.monotonic() - t0
    text = sc.log()
    assert rc == 0 and took < 10, (rc, took, text[-3000:])
    assert "stopped while starting its backend" in text, text[-3000:]
    assert "Traceback" not in text and "error:" not in text, text[-3000:]


async def test_lag_of_a_group_committing_while_it_is_read_is_never_judged_foreign(
    topics: TopicSet, caplog: pytest.LogCaptureFixture
) -> None:
    """A busy group commits between the probe's reads. The committed offsets are read
    before the log ends, so a commit made meanwhile is never beyond the end the probe
    saw, and a live group's position is never taken for an earlier incarnation's (which
    would count the whole log as lag and scale the fleet to its maximum).

    On a busy machine the coordinator's answer comes late; the test makes it late on
    purpose (50 ms before each committed-offset read), as it cannot make the machine
    busy on cue."""
    prod = AIOKafkaProducer(bootstrap_servers=topics.bootstrap, linger_ms=0)
    c = AIOKafkaConsumer(bootstrap_servers=topics.bootstrap, group_id=topics.group,
                         enable_auto_commit=False)  # fmt: skip
    await prod.start()
    await c.start()
    stop = asyncio.Event()
    rounds = 0

    async def produce_and_commit(tp: TopicPartition, tid: str) -> None:
        # Each record committed as soon as it is written: the group's position is
        # at the log end nearly all the time, as a fleet keeping up has it.
        nonlocal rounds
        meta = offset_metadata("tickscale.g.h1", tid)
        while not stop.is_set():
            md = await prod.send_and_wait(topics.raw, b"x" * 10, partition=tp.partition)
            await c.commit({tp: OffsetAndMetadata(md.offset + 1, meta)})
            rounds += 1

    tid = await topic_id(c, topics.raw)
    assert tid
    tps = [TopicPartition(topics.raw, p) for p in range(4)]
    c.assign(tps)
    writers = [asyncio.create_task(produce_and_commit(tp, tid)) for tp in tps]
    lags: list[tuple[int, int]] = []  # (lag, records in the log) per measure
    try:
        # The group's coordinator is up once the first commit is through.
        while rounds == 0:
            assert not any(w.done() for w in writers), [w.result() for w in writers]
            await asyncio.sleep(0.05)
        async with LagProbe(topics.bootstrap, topics.raw, topics.group) as probe:
            read_committed = probe.committed

            async def late_committed() -> dict[int, tuple[int, str]]:
                await asyncio.sleep(0.05)
                return await read_committed()

            probe.committed = late_committed  # type: ignore[method-assign]
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                snap = await probe.measure()
                lags.append((snap.lag_msgs, sum(p.end_offset for p in snap.partitions)))
    finally:
        stop.set()
        await asyncio.gather(*writers)
        await c.stop()
        await prod.stop()
    assert rounds > 50 and len(lags) > 50, (rounds, len(lags))
    said = [r.getMessage() for r in caplog.records if "earlier incarnation" in r.getMessage()]
    assert said == []
    # The group is a few records behind per partition, never a partition's whole log
    # (a quarter of the records); how few depends on the machine's load.
    assert all(lag <= max(16, size // 10) for lag, size in lags), lags


@pytest.mark.slow
def test_a_backend_action_that_keeps_failing_backs_off_and_is_said_once(
    topics: TopicSet, redis_url: str, tmp_path: Path, small_disk: Path
) -> None:
    """A failed change was tried again at every poll past the settle period (here 0.5 s),
    each time with an ERROR line, a handler started and stopped again and an audit
    record: a full disk under the process backend drowned the scaler's log. It is tried
    again after a backoff, and said once, then once a minute, then its end."""
    with (small_disk / "filler").open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    args = ("--state-dir", str(small_disk), "--calendar", "none", "--settle", "0.5",
            "--min-handlers", "1", "--max-handlers", "1", "--name", f"bf{os.getpid()}")  # fmt: skip
    sc = ScalerProc(topics, redis_url, tmp_path, *args)
    errors = 'tickscale_scaler_backend_errors_total\\{op="add"\\}'
    try:
        sc.wait_for(errors, lambda v: v is not None and v >= 1, 60)
        time.sleep(20)
        # Backoff from 2 s, doubling: tries at about 0, 2, 6, 14 s. At every poll after
        # the settle period (0.5 s) it was some 30.
        tries = _metric(sc.metrics(), errors)
        assert tries is not None and 3 <= tries <= 6, tries
        said = [ln for ln in sc.log().splitlines() if "backend action" in ln]
        assert len(said) == 1, said
        assert "add(1)" in said[0] and "No space left" in said[0], said
        assert str(small_disk) in said[0], said
        (small_disk / "filler").unlink()
        running = "tickscale_scaler_running_handlers"
        _wait(lambda: sc.value(running) == 1, 60, "no handler once there is room", sc)
        _wait(lambda: "backend action succeeds again, after" in sc.log(), 10, "no end said", sc)
    finally:
        if sc.proc.poll() is None:
            sc.stop()
