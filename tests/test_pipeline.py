"""End to end on the real broker and Redis: replay -> handlers -> verify.

Handlers are real processes, so a SIGKILL is a real crash; the ledger is
checked with the ``tickscale verify`` command users run.
"""

from __future__ import annotations

import asyncio
import gzip
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.constants import (
    HDR_DL_OFFSET,
    HDR_DL_PARTITION,
    HDR_DL_REASON,
    REDIS_BOOK_SNAPSHOT,
    REDIS_LAST_QUOTE,
)
from core.topology import partitions_of
from ingest.codecs import itch
from ingest.manifest import Manifest
from ingest.replay.source import NS, parse_hhmm
from ingest.replay.synthetic import SyntheticDay
from scaler.capacity import project, read_handler_stats
from tests.pipeline_utils import (
    HandlerProc,
    json_trades,
    run_replay,
    run_verify,
    start_replay,
    summary,
)
from tickscale.localstack import RedisServer
from tickscale.localstack.topics import TopicSet

DAY = "2024-11-25"
ZERO = {"missing": 0, "duplicated": 0, "reordered": 0, "checksum_mismatch": 0}


def _assert_exact(rc: int, out: str) -> None:
    assert summary(out) == ZERO, out[-3000:]
    assert rc == 0, out[-3000:]


async def _read_all(bootstrap: str, topic: str) -> list[object]:
    c = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await c.start()
    try:
        parts = await partitions_of(bootstrap, topic)
        tps = [TopicPartition(topic, p) for p in parts]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await c.end_offsets(tps)
        out: list[object] = []
        while True:
            positions = [await c.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            b = await c.getmany(timeout_ms=1000)
            for recs in b.values():
                out.extend(recs)
        return out
    finally:
        await c.stop()


@pytest.mark.slow
async def test_replay_handler_verify_and_deadletters(
    topics: TopicSet, tmp_path: Path, redis_url: str
) -> None:
    manifest = tmp_path / "m.json"
    run_replay(
        topics,
        manifest,
        "--symbols",
        "8",
        "--seed",
        "11",
        "--date",
        DAY,
        "--from",
        "09:28",
        "--to",
        "09:36",
        "--speed",
        "max",
        "--malformed-every",
        "1500",
    )
    m = Manifest.read(manifest)
    assert m.deadletters_expected > 0
    assert sum(s.ticks for s in m.symbols.values()) > 1000
    assert m.book_errors == {}
    h = HandlerProc(topics, tmp_path, "a", redis_url)
    try:
        rc, out = run_verify(topics, manifest)
        _assert_exact(rc, out)
        assert f"deadletters={m.deadletters_expected} expected={m.deadletters_expected}" in out
        assert h.metric("tickscale_handler_deadletters_total") == m.deadletters_expected
        # Redis holds the latest quote per symbol for downstream readers.
        r = redis.Redis.from_url(redis_url)
        sym = next(iter(m.symbols))
        deadline = time.monotonic() + 10
        while not r.exists(REDIS_LAST_QUOTE + sym) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        q = r.hgetall(REDIS_LAST_QUOTE + sym)
        assert q[b"symbol"].decode() == sym and q[b"kind"] == b"quote"
        # The self-report the scaler's capacity model reads, refreshed about every second.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            consumed = h.metric("tickscale_handler_messages_in_total")
            ra = aredis.Redis.from_url(redis_url)
            try:
                mine = [s for s in await read_handler_stats(ra) if s.handler_id == "a"]
            finally:
                await ra.aclose()
            if mine and mine[0].messages == consumed:
                break
            await asyncio.sleep(0.3)
        assert len(mine) == 1 and mine[0].messages == consumed > 0, mine
        st = mine[0]
        assert st.batches > 0 and st.max_batch == 2000
        assert st.cpu_s is not None and 0 < st.cpu_s and 0 < st.busy_s
        assert project(st.messages, st.busy_s, st.cpu_s, st.batches, st.max_batch) > 0
    finally:
        h.close()

    # Each dead letter carries the original bytes and where they came from.
    dls = await _read_all(topics.bootstrap, topics.deadletter)
    raws = {(r.partition, r.offset): r for r in await _read_all(topics.bootstrap, topics.raw)}  # type: ignore[attr-defined]
    assert len(dls) == m.deadletters_expected
    for d in dls:
        hdr = dict(d.headers)  # type: ignore[attr-defined]
        src = raws[(int(hdr[HDR_DL_PARTITION]), int(hdr[HDR_DL_OFFSET]))]
        assert d.value == src.value  # type: ignore[attr-defined]
        assert hdr[HDR_DL_REASON].split(b":")[0] in (b"truncated", b"unknown_type", b"bad_side")


@pytest.mark.slow
async def test_sigkill_and_scale_out_mid_replay_lose_nothing(
    topics: TopicSet, tmp_path: Path, redis_url: str
) -> None:
    """A handler crashes (SIGKILL) and another joins while the day replays."""
    manifest = tmp_path / "m.json"
    a = HandlerProc(topics, tmp_path, "a", redis_url)
    b = HandlerProc(topics, tmp_path, "b", redis_url)
    handlers = [a, b]
    try:
        a.wait_ready()
        b.wait_ready()
        rp = start_replay(
            topics,
            manifest,
            tmp_path / "replay.log",
            "--symbols",
            "8",
            "--seed",
            "5",
            "--date",
            DAY,
            "--from",
            "09:29",
            "--to",
            "09:34",
            "--speed",
            "20",
        )
        await asyncio.sleep(5)
        assert a.metric("tickscale_handler_messages_in_total") > 0
        a.kill()  # no drain, no commit, no LeaveGroup: a crash
        await asyncio.sleep(3)
        c = HandlerProc(topics, tmp_path, "c", redis_url)
        handlers.append(c)
        assert rp.wait(180) == 0, (tmp_path / "replay.log").read_text()[-2000:]
        rc, out = run_verify(topics, manifest)
        _assert_exact(rc, out)
        # The survivors did restore state for partitions they took over.
        assert b.metric("tickscale_handler_rebalances_total") >= 2
    finally:
        for h in handlers:
            h.close()


def _wait_metric(
    h: HandlerProc, name: str, want: float, timeout: float, at_least: bool = False
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = h.metric(name)
        if v == want or (at_least and v > want):
            return
        time.sleep(0.2)
    raise AssertionError(f"{h.name}: {name} never reached {want}: {h.log()}")


def _fenced(h: HandlerProc) -> float:
    """Transactions the handler had to abort as a stale owner: its offset commit
    refused by the group (GroupFenced), or its transactional id fenced by a new
    owner that found the transaction open (ProducerFenced)."""
    return sum(
        h.metric("tickscale_handler_transaction_aborts_total", reason)
        for reason in ("GroupFenced", "ProducerFenced")
    )


@pytest.mark.slow
async def test_frozen_handler_resumes_as_a_fenced_zombie(
    topics: TopicSet, tmp_path: Path, redis_url: str
) -> None:
    """A handler frozen (SIGSTOP) past its session timeout loses its partitions while it
    still believes it owns them; thawed, it is a zombie with fetched records and open
    producer. The group's fencing must keep every one of its late writes out."""
    manifest = tmp_path / "m.json"
    a = HandlerProc(topics, tmp_path, "a", redis_url)
    b = HandlerProc(topics, tmp_path, "b", redis_url)
    try:
        a.wait_ready()
        b.wait_ready()
        _wait_metric(a, "tickscale_handler_assigned_partitions", topics.raw_partitions / 2, 30)
        rp = start_replay(
            topics,
            manifest,
            tmp_path / "replay.log",
            "--symbols",
            "8",
            "--seed",
            "11",
            "--date",
            DAY,
            "--from",
            "09:29",
            "--to",
            "09:45",
            "--speed",
            "25",
        )
        await asyncio.sleep(4)
        # A thawed handler may learn of its eviction from a heartbeat before it writes
        # anything (then it is no zombie): freeze it again, while the feed runs.
        cycles = 0
        while cycles < 4 and rp.poll() is None:
            cycles += 1
            assert a.metric("tickscale_handler_messages_in_total") > 0
            joins = a.metric("tickscale_handler_rebalances_total")
            a.proc.send_signal(signal.SIGSTOP)
            try:
                # The session timeout (6 s here) expires and b takes every partition.
                _wait_metric(b, "tickscale_handler_assigned_partitions", topics.raw_partitions, 60)
                await asyncio.sleep(2)  # b commits output for a's former partitions
            finally:
                a.proc.send_signal(signal.SIGCONT)
            # The zombie finds out and rejoins (its partition gauge is stale until then).
            _wait_metric(a, "tickscale_handler_rebalances_total", joins + 1, 60, at_least=True)
            _wait_metric(b, "tickscale_handler_assigned_partitions", topics.raw_partitions / 2, 60)
            if _fenced(a) > 0:
                break
        assert rp.wait(180) == 0, (tmp_path / "replay.log").read_text()[-2000:]
        rc, out = run_verify(topics, manifest)
        _assert_exact(rc, out)
        # The zombie did write late, and was fenced.
        assert _fenced(a) > 0, f"{cycles} freezes: {a.log()}"
        for h in (a, b):
            _assert_retries_summarised(h)
    finally:
        a.close()
        b.close()


def _assert_retries_summarised(h: HandlerProc) -> None:
    """The producer's retried produces are counted and reported at most once a minute
    (this test's handlers logged 98 and 232 warnings, one per retry, before)."""
    text = h.log_path.read_text(errors="replace")
    assert "retrying. Error:" not in text
    reports = text.count("produce retried (")
    retries = h.metric("tickscale_handler_produce_retries_total")
    assert reports <= 3  # this test runs under two minutes
    assert (reports > 0) == (retries > 0), (reports, retries)


@pytest.mark.slow
async def test_graceful_scale_in_and_out_lose_nothing(
    topics: TopicSet, tmp_path: Path, redis_url: str
) -> None:
    """Handlers join and leave (SIGTERM, and SIGHUP as from a closed terminal) repeatedly
    during a replay."""
    manifest = tmp_path / "m.json"
    first = HandlerProc(topics, tmp_path, "h0", redis_url)
    live = [first]
    every = [first]
    try:
        first.wait_ready()
        rp = start_replay(
            topics,
            manifest,
            tmp_path / "replay.log",
            "--symbols",
            "8",
            "--seed",
            "9",
            "--date",
            DAY,
            "--from",
            "09:29",
            "--to",
            "09:35",
            "--speed",
            "20",
        )
        for i in range(1, 4):
            await asyncio.sleep(3)
            h = HandlerProc(topics, tmp_path, f"h{i}", redis_url)
            live.append(h)
            every.append(h)
        await asyncio.sleep(3)
        leaving = live.pop(0)
        assert leaving.terminate() == 0, leaving.log()
        await asyncio.sleep(3)
        leaving = live.pop(0)
        assert leaving.terminate(sig=signal.SIGHUP) == 0, leaving.log()
        assert rp.wait(180) == 0
        rc, out = run_verify(topics, manifest)
        _assert_exact(rc, out)
        # Every move was a hand-over (rebalance or SIGTERM): the old owner wrote its
        # snapshot at the committed offset before letting go, so nothing was replayed.
        for h in live:
            assert h.metric("tickscale_handler_restore_seconds_count") > 0, h.log()
            assert h.metric("tickscale_handler_restore_replayed_total") == 0, h.log()
    finally:
        for h in every:
            h.close()


@pytest.mark.slow
async def test_restore_uses_snapshot_at_committed_offset(
    topics: TopicSet, tmp_path: Path, redis_url: str
) -> None:
    manifest = tmp_path / "m.json"
    run_replay(
        topics,
        manifest,
        "--symbols",
        "6",
        "--seed",
        "3",
        "--date",
        DAY,
        "--from",
        "09:29",
        "--to",
        "09:33",
        "--speed",
        "max",
    )
    a = HandlerProc(topics, tmp_path, "a", redis_url)
    try:
        rc, out = run_verify(topics, manifest)
        _assert_exact(rc, out)
        assert a.terminate() == 0  # SIGTERM: drain, commit, snapshot, leave
    finally:
        a.close()
    r = redis.Redis.from_url(redis_url)
    keys = r.keys(REDIS_BOOK_SNAPSHOT + "*")
    assert len(keys) == topics.raw_partitions
    # A second replay continues the same day; the new handler must start from
    # the snapshots (nothing to replay) and still produce exact output.
    b = HandlerProc(topics, tmp_path, "b", redis_url)
    try:
        b.wait_ready()
        deadline = time.monotonic() + 20
        while b.metric("tickscale_handler_restore_seconds_count") < topics.raw_partitions:
            assert time.monotonic() < deadline, b.log()
            await asyncio.sleep(0.2)
        assert b.metric("tickscale_handler_restore_replayed_total") == 0
    finally:
        b.close()


@pytest.mark.slow
async def test_restore_without_redis_replays_from_start(topics: TopicSet, tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    run_replay(
        topics,
        manifest,
        "--symbols",
        "6",
        "--seed",
        "4",
        "--date",
        DAY,
        "--from",
        "09:29",
        "--to",
        "09:31",
        "--speed",
        "max",
    )
    a = HandlerProc(topics, tmp_path, "a")  # no Redis at all
    try:
        rc, out = run_verify(topics, manifest)
        _assert_exact(rc, out)
        assert a.terminate() == 0
    finally:
        a.close()
    b = HandlerProc(topics, tmp_path, "b")
    try:
        b.wait_ready()
        deadline = time.monotonic() + 30
        while b.metric("tickscale_handler_restore_seconds_count") < topics.raw_partitions:
            assert time.monotonic() < deadline, b.log()
            await asyncio.sleep(0.2)
        m = Manifest.read(manifest)
        replayed = b.metric("tickscale_handler_restore_replayed_total")
        # Every raw record (including broadcast copies) is replayed silently.
        assert replayed == m.records_sent
        rc, out = run_verify(topics, manifest, timeout_s=5)
        _assert_exact(rc, out)  # the silent replay emitted nothing new
    finally:
        b.close()


@pytest.mark.slow
async def test_redis_outage_degrades_only_the_cache(
    topics: TopicSet, tmp_path: Path, redis_server: RedisServer
) -> None:
    manifest = tmp_path / "m.json"
    h = HandlerProc(topics, tmp_path, "a", redis_server.url)
    try:
        h.wait_ready()
        rp = start_replay(
            topics,
            manifest,
            tmp_path / "replay.log",
            "--symbols",
            "6",
            "--seed",
            "8",
            "--date",
            DAY,
            "--from",
            "09:29",
            "--to",
            "09:33",
            "--speed",
            "30",
        )
        await asyncio.sleep(2)
        redis_server.stop()
        t_stop = time.monotonic()
        ticks_at_stop = h.metric("tickscale_handler_ticks_out_total")
        await asyncio.sleep(4)
        # Ticks kept flowing to Kafka with Redis down.
        assert h.metric("tickscale_handler_ticks_out_total") > ticks_at_stop
        assert h.metric("tickscale_handler_redis_errors_total") > 0
        assert time.monotonic() - t_stop < 30
        redis_server.start()
        assert rp.wait(180) == 0
        rc, out = run_verify(topics, manifest)
        _assert_exact(rc, out)
        # After recovery the cache is written again.
        r = redis.Redis.from_url(redis_server.url)
        deadline = time.monotonic() + 15
        while not r.keys(REDIS_LAST_QUOTE + "*"):
            assert time.monotonic() < deadline, h.log()
            await asyncio.sleep(0.3)
    finally:
        h.close()


@pytest.mark.slow
async def test_jsonl_replay_with_a_bad_line(topics: TopicSet, tmp_path: Path) -> None:
    lines = [
        *json_trades("BTC-USD", 50),
        {
            "type": "quote",
            "symbol": "ETH-USD",
            "venue": "XCOI",
            "ts": "2024-11-25T14:30:01Z",
            "bid_px": "3400.1",
            "bid_sz": "2",
            "ask_px": "3400.2",
            "ask_sz": None,
        },
    ]
    f = tmp_path / "feed.jsonl"
    body = b"\n".join(orjson.dumps(x) for x in lines)
    f.write_bytes(body + b'\n{"type": "trade", "symbol": "BTC-USD", "price": "-1"}\n')
    manifest = tmp_path / "m.json"
    run_replay(topics, manifest, "--source", "jsonl", "--file", str(f), "--speed", "max")
    m = Manifest.read(manifest)
    assert m.symbols["BTC-USD"].ticks == 50 and m.symbols["ETH-USD"].quotes == 1
    assert m.deadletters_expected == 1
    h = HandlerProc(topics, tmp_path, "a")
    try:
        rc, out = run_verify(topics, manifest)
        _assert_exact(rc, out)
        assert "deadletters=1 expected=1" in out
    finally:
        h.close()


@pytest.mark.slow
async def test_itch_file_replay_end_to_end(topics: TopicSet, tmp_path: Path) -> None:
    """A gzip TotalView-ITCH 5.0 file (2-byte length framing, as the public sample days)
    replayed for a window after the open and for three of its four stocks: the snapshot at
    the window start rebuilds their books, and every tick arrives exactly once."""
    end_ns = parse_hhmm("09:33") * NS
    path = tmp_path / "day.itch.gz"
    n = 0
    stocks = []
    with gzip.open(path, "wb") as f:
        for msg in SyntheticDay(4, 5):
            if msg.ts_ns >= end_ns:
                break
            if isinstance(d := itch.decode(msg.payload), itch.StockDirectory):
                stocks.append(d.stock.rstrip())
            f.write(itch.frame(msg.payload))
            n += 1
    assert n > 10_000 and len(stocks) == 4
    manifest = tmp_path / "m.json"
    run_replay(
        topics, manifest, "--source", "itch", "--file", str(path), "--date", DAY,
        "--from", "09:29", "--to", "09:33", "--speed", "max", "--only", ",".join(stocks[:3]),
    )  # fmt: skip
    m = Manifest.read(manifest)
    assert set(m.symbols) == set(stocks[:3]) and sum(s.ticks for s in m.symbols.values()) > 500
    assert m.book_errors == {}
    h = HandlerProc(topics, tmp_path, "a")
    try:
        rc, out = run_verify(topics, manifest)
        _assert_exact(rc, out)
        assert h.metric("tickscale_handler_book_errors_total") == 0
    finally:
        h.close()


@pytest.mark.slow
def test_verify_detects_loss(topics: TopicSet, tmp_path: Path) -> None:
    """With no handler running nothing arrives: verify must fail, not pass."""
    manifest = tmp_path / "m.json"
    run_replay(
        topics,
        manifest,
        "--symbols",
        "3",
        "--seed",
        "2",
        "--date",
        DAY,
        "--from",
        "09:30",
        "--to",
        "09:31",
        "--speed",
        "max",
    )
    rc, out = run_verify(topics, manifest, timeout_s=2)
    assert rc == 1
    assert summary(out)["missing"] == sum(s.ticks for s in Manifest.read(manifest).symbols.values())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bootstrap", "no-port-here"], "--bootstrap"),
        (["--redis", "http://x"], "--redis"),
        (["--max-batch", "0"], "--max-batch"),
    ],
)
def test_handler_bad_config_names_the_setting(args: list[str], needle: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tickscale", "handler", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert needle in r.stderr, r.stderr


def test_replay_rejects_a_holiday(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tickscale",
            "replay",
            "--date",
            "2024-12-25",
            "--manifest",
            str(tmp_path / "m.json"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "--date" in r.stderr and "not a XNYS trading day" in r.stderr
