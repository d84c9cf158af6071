"""Poison records on the real broker: dead-lettered once, and the partition moves on.

A record whose date header is not a date and a JSON line whose ``ts`` does not
fit in 64 bits used to stop their partition for good (the handler exited, or
restored the partition for ever). A running handler now dead-letters exactly
those records with their reason, original bytes and headers, every good
record's ticks arrive exactly once, also across a crash and a restore that
replays through the poison, and the handler stays up. A record that keeps
failing its commit is found and dead-lettered as ``repeated_failure``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotEnoughReplicasError,
    ProducerFenced,
    RequestTimedOutError,
)

from core.constants import (
    HDR_CODEC,
    HDR_DATE,
    HDR_DL_OFFSET,
    HDR_DL_PARTITION,
    HDR_DL_REASON,
    HDR_SEQ,
)
from core.topology import partitions_of
from ingest import metrics
from ingest.codecs import itch
from ingest.handler.partition import Batch, PartitionWorker
from ingest.handler.poison import PoisonTracker, may_be_the_records
from ingest.handler.service import FeedHandler
from ingest.handler.settings import HandlerSettings
from ingest.manifest import Manifest
from tests.pipeline_utils import HandlerProc, json_trades, run_replay, run_verify, summary
from tickscale.localstack import KafkaBroker, delete_topics, ensure_topics
from tickscale.localstack.topics import MakeTopics, TopicSet

DAY = b"2024-11-25"
Headers = list[tuple[str, bytes]]


async def _read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every committed record of ``topic``."""
    c = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await c.end_offsets(tps)
        out: list[Any] = []
        while not all([await c.position(tp) >= ends[tp] for tp in tps]):
            for recs in (await c.getmany(timeout_ms=1000)).values():
                out.extend(recs)
        return out
    finally:
        await c.stop()


async def _produce(bootstrap: str, topic: str, records: list[tuple[int, bytes, Headers]]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        for part, value, headers in records:
            await p.send_and_wait(topic, value, partition=part, headers=headers)
    finally:
        await p.stop()


def _itch(
    part: int, msg: itch.ItchMessage, seq: int, day: bytes = DAY
) -> tuple[int, bytes, Headers]:
    return part, itch.encode(msg), [(HDR_CODEC, b"itch"), (HDR_DATE, day), (HDR_SEQ, b"%d" % seq)]


def _json(part: int, obj: dict[str, Any] | bytes) -> tuple[int, bytes, Headers]:
    value = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    return part, value, [(HDR_CODEC, b"json")]


def _huge_ts_line(symbol: str) -> bytes:
    # Written by hand: no JSON library here writes an integer this large.
    return (
        b'{"type":"trade","symbol":"%s","venue":"XCOI","ts":%d,"price":"1.5","size":"2",'
        b'"side":"B","trade_id":"huge"}' % (symbol.encode(), 2**64 + 7)
    )


def _first_day(part: int, stock: str, locate: int) -> list[tuple[int, bytes, Headers]]:
    """Good ITCH and JSON records of one partition with the two poison records among them."""
    sd = itch.StockDirectory(
        locate, 0, 1, stock, "Q", "N", 100, "N", "C", "Z", "P", "N", "N", "1", "N", 0, "N"
    )
    recs = [_itch(part, sd, 1)]
    for i in range(5):
        recs.append(
            _itch(
                part,
                itch.AddOrder(locate, 0, 10 + i, 1000 * locate + i, "B", 100, stock, 100_0000 + i),
                2 + i,
            )
        )
    # Case 1: the date header is not a date. The order it adds must not enter the book.
    recs.append(
        _itch(
            part,
            itch.AddOrder(locate, 0, 20, 1000 * locate + 99, "B", 100, stock, 200_0000),
            7,
            day=b"yesterday",
        )
    )
    jsym = f"J{part}"
    trades = json_trades(jsym, 6)
    recs += [_json(part, t) for t in trades[:3]]
    recs.append(_json(part, _huge_ts_line(jsym)))  # case 2
    recs += [_json(part, t) for t in trades[3:]]
    return recs


def _match(locate: int, i: int) -> int:
    return 77_000 + 10 * locate + i


def _second_day(part: int, stock: str, locate: int) -> list[tuple[int, bytes, Headers]]:
    """Executions against the orders the first records rested: they need the book
    rebuilt exactly, poison excluded, by whoever restores the partition."""
    # Best bid first, so each execution moves the top (a trade and a quote each).
    recs = [
        _itch(
            part,
            itch.OrderExecuted(locate, 0, 100 + k, 1000 * locate + i, 100, _match(locate, i)),
            8 + k,
        )
        for k, i in enumerate(reversed(range(5)))
    ]
    # The poisoned add never happened: executing it is an unknown order (counted, no tick).
    recs.append(
        _itch(part, itch.OrderExecuted(locate, 0, 200, 1000 * locate + 99, 100, 99_999), 13)
    )
    recs += [_json(part, t) for t in json_trades(f"K{part}", 3)]
    return recs


def _wait_consumed(h: HandlerProc, n: int, timeout: float = 120) -> None:
    h.wait_ready(timeout)
    deadline = time.monotonic() + timeout
    while h.metric("tickscale_handler_messages_in_total") < n:
        assert h.proc.poll() is None, h.log()
        assert time.monotonic() < deadline, h.log()
        time.sleep(0.3)


@pytest.mark.slow
async def test_poison_is_dead_lettered_and_good_records_arrive_once(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    ts = await make_topics(raw_partitions=2, ticks_partitions=2)
    stocks = {0: ("AAPL", 1), 1: ("MSFT", 2)}
    first = [r for p, (s, loc) in stocks.items() for r in _first_day(p, s, loc)]
    second = [r for p, (s, loc) in stocks.items() for r in _second_day(p, s, loc)]
    await _produce(ts.bootstrap, ts.raw, first)

    a = HandlerProc(ts, tmp_path, "a")  # no Redis: the next owner replays from offset 0
    try:
        _wait_consumed(a, len(first))
        assert a.metric("tickscale_handler_deadletters_total") == 4
        assert a.metric("tickscale_handler_transaction_aborts_total") == 0
        a.kill()  # a crash: the next owner restores by replaying through the poison
    finally:
        a.close()
    await _produce(ts.bootstrap, ts.raw, second)
    b = HandlerProc(ts, tmp_path, "b")
    try:
        _wait_consumed(b, len(second))
        assert b.proc.poll() is None
        assert b.metric("tickscale_handler_deadletters_total") == 0
    finally:
        b.close()

    raws = {(r.partition, r.offset): r for r in await _read_all(ts.bootstrap, ts.raw)}
    dls = await _read_all(ts.bootstrap, ts.deadletter)
    reasons = Counter()
    for d in dls:
        hdr = dict(d.headers)
        src = raws[(int(hdr[HDR_DL_PARTITION]), int(hdr[HDR_DL_OFFSET]))]
        assert d.value == src.value
        for k, v in src.headers:  # the original headers travel with it
            assert (k, v) in d.headers
        reasons[hdr[HDR_DL_REASON].split(b":")[0].decode()] += 1
        if hdr[HDR_DL_REASON].startswith(b"bad_date"):
            assert dict(src.headers)[HDR_DATE] == b"yesterday"
        else:
            assert b'"ts":18446744073709551623' in src.value
    assert reasons == {"bad_date": 2, "invalid_json": 2}

    ticks = [orjson.loads(t.value) for t in await _read_all(ts.bootstrap, ts.ticks)]
    keys = [(t["symbol"], t["seq"]) for t in ticks]
    assert len(keys) == len(set(keys)), "a tick arrived twice"
    by_sym: dict[str, list[dict[str, Any]]] = {}
    for t in ticks:
        by_sym.setdefault(t["symbol"], []).append(t)
    for sym, ts_ in by_sym.items():
        assert sorted(t["seq"] for t in ts_) == list(range(1, len(ts_) + 1)), sym
    for p, (stock, loc) in stocks.items():
        # JSON: every good trade once, the poisoned one never.
        assert sorted(t["trade_id"] for t in by_sym[f"J{p}"]) == [str(i) for i in range(6)]
        assert len(by_sym[f"K{p}"]) == 3
        # ITCH: 5 adds (a quote each: the best bid rises), then 5 executions, each a
        # trade and a quote; nothing from the poisoned add or its execution.
        mine = by_sym[stock]
        trades = [t for t in mine if t["kind"] == "trade"]
        assert [t["trade_id"] for t in trades] == [str(_match(loc, i)) for i in reversed(range(5))]
        assert len(mine) == 5 + 5 * 2, mine
        assert all(t["bid_px"] != "200.0000" for t in mine if t["kind"] == "quote")


@pytest.mark.slow
async def test_a_jsonl_line_whose_ts_does_not_fit_64_bits(topics: TopicSet, tmp_path: Path) -> None:
    """Through the replay and the ledger users run: the line is expected dead, and is."""
    f = tmp_path / "feed.jsonl"
    good = b"\n".join(orjson.dumps(x) for x in json_trades("BTC-USD", 40))
    f.write_bytes(good + b"\n" + _huge_ts_line("BTC-USD") + b"\n")
    manifest = tmp_path / "m.json"
    run_replay(topics, manifest, "--source", "jsonl", "--file", str(f), "--speed", "max")
    m = Manifest.read(manifest)
    assert m.deadletters_expected == 1 and m.symbols["BTC-USD"].ticks == 40
    h = HandlerProc(topics, tmp_path, "a")
    try:
        h.wait_ready()
        rc, out = run_verify(topics, manifest)
        assert summary(out) == {
            "missing": 0,
            "duplicated": 0,
            "reordered": 0,
            "checksum_mismatch": 0,
        }
        assert rc == 0 and "deadletters=1 expected=1" in out, out
        assert h.proc.poll() is None
        assert h.metric("tickscale_handler_transaction_aborts_total") == 0
    finally:
        h.close()


BOOM = b"refused at commit"


@pytest.mark.slow
async def test_a_record_that_keeps_failing_its_commit_is_dead_lettered(
    make_topics: MakeTopics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record whose commit keeps failing while others commit: found one record at a
    time and dead-lettered as repeated_failure, without a hot loop of restores.

    No real record fails only at commit time any more (each is serialised as it is
    applied), so the fault is injected: the batch holding the record fails in send.
    """
    ts = await make_topics(raw_partitions=1, ticks_partitions=1)
    trades = json_trades("BTC-USD", 12)
    bad = dict(trades[5], trade_id=BOOM.decode())
    lines = [*trades[:5], bad, *trades[5:]]
    await _produce(ts.bootstrap, ts.raw, [_json(0, t) for t in lines])

    real_send = PartitionWorker.send
    attempts = []

    async def send(self: PartitionWorker, producer: AIOKafkaProducer, b: Batch) -> list[Any]:
        poisoned = [r for r in b.records if BOOM in (r.value or b"")]
        if poisoned and not any(dl.record is poisoned[0] for dl in b.dead):
            attempts.append(len(b.records))
            raise RuntimeError("the broker refuses this record")
        return await real_send(self, producer, b)

    monkeypatch.setattr(PartitionWorker, "send", send)
    s = HandlerSettings(
        bootstrap=ts.bootstrap,
        in_topic=ts.raw,
        out_topic=ts.ticks,
        deadletter_topic=ts.deadletter,
        group=ts.group,
        handler_id="poison",
        metrics_host="127.0.0.1",
        metrics_port=0,
        poison_after=2,
    )
    dl_before = metrics.DEADLETTERS.labels("repeated_failure")._value.get()
    await _run_until(s, len(lines))
    assert metrics.DEADLETTERS.labels("repeated_failure")._value.get() == dl_before + 1
    # Batches failed twice at the same offset, then the record alone twice: no more.
    assert len(attempts) == 4 and attempts[-2:] == [1, 1], attempts

    dls = await _read_all(ts.bootstrap, ts.deadletter)
    assert len(dls) == 1
    hdr = dict(dls[0].headers)
    assert hdr[HDR_DL_REASON].startswith(b"repeated_failure: RuntimeError: the broker refuses")
    assert (hdr[HDR_DL_PARTITION], hdr[HDR_DL_OFFSET]) == (b"0", b"5")
    assert dls[0].value == orjson.dumps(bad) and hdr[HDR_CODEC] == b"json"
    ticks = [orjson.loads(t.value) for t in await _read_all(ts.bootstrap, ts.ticks)]
    assert [t["trade_id"] for t in ticks] == [str(i) for i in range(12)]
    # The withheld record consumed its sequence number, as the restore's replay will.
    assert [t["seq"] for t in ticks] == [*range(1, 6), *range(7, 14)]


async def _run_until(s: HandlerSettings, messages: int, within_s: float = 120) -> None:
    """Run an in-process handler until it has committed ``messages`` records."""
    async with FeedHandler(s) as h:
        run = asyncio.create_task(h.run())
        try:
            async with asyncio.timeout(within_s):
                while h.meter.messages < messages:
                    assert not run.done(), run
                    await asyncio.sleep(0.2)
        finally:
            h.request_stop()
            await run


@pytest.mark.slow
async def test_a_time_out_at_commit_is_retried_and_never_blamed_on_a_record(
    make_topics: MakeTopics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits of the same record time out more often than poison_after, alone too:
    a time-out is the broker's, so the record is retried with backoff and its
    ticks arrive once it commits. (The client rides out a real outage inside the
    transaction, so the time-outs are injected.)"""
    ts = await make_topics(raw_partitions=1, ticks_partitions=1)
    trades = json_trades("BTC-USD", 8)
    await _produce(ts.bootstrap, ts.raw, [_json(0, t) for t in trades])
    real_send = PartitionWorker.send
    attempts = []

    async def send(self: PartitionWorker, producer: AIOKafkaProducer, b: Batch) -> list[Any]:
        if any(r.offset == 3 for r in b.records) and len(attempts) < 6:
            attempts.append(len(b.records))
            raise KafkaTimeoutError()
        return await real_send(self, producer, b)

    monkeypatch.setattr(PartitionWorker, "send", send)
    s = HandlerSettings(
        bootstrap=ts.bootstrap,
        in_topic=ts.raw,
        out_topic=ts.ticks,
        deadletter_topic=ts.deadletter,
        group=ts.group,
        handler_id="timeouts",
        metrics_host="127.0.0.1",
        metrics_port=0,
        poison_after=2,
    )
    await _run_until(s, len(trades))
    # Into the one-at-a-time search after two, then record 3 alone four times.
    assert len(attempts) == 6 and attempts[2:] == [1, 1, 1, 1], attempts
    assert await _read_all(ts.bootstrap, ts.deadletter) == []
    ticks = [orjson.loads(t.value) for t in await _read_all(ts.bootstrap, ts.ticks)]
    assert [(t["trade_id"], t["seq"]) for t in ticks] == [(str(i), i + 1) for i in range(8)]


@pytest.mark.slow
async def test_a_dead_letter_too_large_for_its_topic_is_written_bare(
    make_topics: MakeTopics,
) -> None:
    """A real record-specific commit failure: the broker refuses a dead letter larger
    than the dead-letter topic allows. The record is found one at a time, and its
    dead letter finally goes without the record's bytes; the rest flows through."""
    ts = await make_topics(raw_partitions=1, ticks_partitions=1)
    small_dl = f"{ts.prefix}.small-dl"
    await ensure_topics(ts.bootstrap, {small_dl: 1}, configs={"max.message.bytes": "1500"})
    trades = json_trades("BTC-USD", 8)
    garbage = b"{" + b"x" * 3000
    await _produce(
        ts.bootstrap,
        ts.raw,
        [*(_json(0, t) for t in trades[:4]), _json(0, garbage), *(_json(0, t) for t in trades[4:])],
    )
    s = HandlerSettings(
        bootstrap=ts.bootstrap,
        in_topic=ts.raw,
        out_topic=ts.ticks,
        deadletter_topic=small_dl,
        group=ts.group,
        handler_id="big",
        metrics_host="127.0.0.1",
        metrics_port=0,
        poison_after=2,
    )
    aborts = sum(
        m.value for m in metrics.TXN_ABORTS.collect()[0].samples if m.name.endswith("_total")
    )
    try:
        await _run_until(s, 9)
        dls = await _read_all(ts.bootstrap, small_dl)
    finally:
        await delete_topics(ts.bootstrap, [small_dl], timeout_s=10)
    after = sum(
        m.value for m in metrics.TXN_ABORTS.collect()[0].samples if m.name.endswith("_total")
    )
    # The batch twice, the record alone twice, its full dead letter twice.
    assert after - aborts == 6
    assert len(dls) == 1 and dls[0].value == b""
    hdr = dict(dls[0].headers)
    assert hdr[HDR_DL_REASON].startswith(b"repeated_failure: MessageSizeTooLargeError"), hdr
    assert b"without the record's 3001 bytes" in hdr[HDR_DL_REASON]
    assert hdr[HDR_DL_OFFSET] == b"4" and HDR_CODEC not in hdr
    ticks = [orjson.loads(t.value) for t in await _read_all(ts.bootstrap, ts.ticks)]
    assert [t["trade_id"] for t in ticks] == [str(i) for i in range(8)]


@pytest.mark.slow
async def test_a_broker_outage_while_searching_dead_letters_no_good_record(
    make_topics: MakeTopics, kafka_broker: KafkaBroker
) -> None:
    """The broker dies while a partition commits one record at a time: the search
    goes on once it is back, nothing good is dead-lettered, even with
    poison_after=1, and nothing is lost or repeated."""
    ts = await make_topics(raw_partitions=1, ticks_partitions=1)
    small_dl = f"{ts.prefix}.small-dl"
    await ensure_topics(ts.bootstrap, {small_dl: 1}, configs={"max.message.bytes": "1500"})
    trades = json_trades("BTC-USD", 30)
    # The oversized malformed record puts the partition into the one-at-a-time search.
    await _produce(
        ts.bootstrap, ts.raw, [_json(0, b"{" + b"x" * 3000), *(_json(0, t) for t in trades)]
    )
    real_send = PartitionWorker.send
    restarted: list[asyncio.Task[Any]] = []

    async def send(self: PartitionWorker, producer: AIOKafkaProducer, b: Batch) -> list[Any]:
        if not restarted and self.one_at_a_time and b.records[0].offset == 10:
            kafka_broker.kill()  # right as record 10 commits alone
            restarted.append(asyncio.create_task(_start_later(kafka_broker, 8)))
        return await real_send(self, producer, b)

    s = HandlerSettings(
        bootstrap=ts.bootstrap,
        in_topic=ts.raw,
        out_topic=ts.ticks,
        deadletter_topic=small_dl,
        group=ts.group,
        handler_id="outage",
        metrics_host="127.0.0.1",
        metrics_port=0,
        poison_after=1,
        session_timeout_ms=30_000,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PartitionWorker, "send", send)
        await _run_until(s, 31, within_s=300)
    assert restarted, "the outage never happened"
    await restarted[0]
    dls = await _read_all(ts.bootstrap, small_dl)
    await delete_topics(ts.bootstrap, [small_dl], timeout_s=10)
    assert [dict(d.headers)[HDR_DL_OFFSET] for d in dls] == [b"0"]
    ticks = [orjson.loads(t.value) for t in await _read_all(ts.bootstrap, ts.ticks)]
    assert [t["trade_id"] for t in ticks] == [str(i) for i in range(30)]


async def _start_later(broker: KafkaBroker, delay: float) -> None:
    await asyncio.sleep(delay)
    await asyncio.to_thread(broker.start)


# The tracker's rules, without a broker ------------------------------------------------------

TP0 = TopicPartition("md.raw", 0)


def test_tracker_narrows_down_only_after_n_failures_at_one_offset() -> None:
    t = PoisonTracker(after=3)
    err = RuntimeError("refused")
    t.failed(TP0, 10, 50, err)
    t.failed(TP0, 10, 40, err)
    assert not t.one_at_a_time(TP0, 10)
    t.failed(TP0, 12, 60, err)  # progress in between: the count starts again
    t.failed(TP0, 12, 60, err)
    assert not t.one_at_a_time(TP0, 12)
    t.failed(TP0, 12, 55, err)
    # One at a time up to the end of the largest batch that failed there.
    assert t.one_at_a_time(TP0, 12) and t.one_at_a_time(TP0, 59)
    assert not t.one_at_a_time(TP0, 60)
    assert t.condemned(TP0) == {}


def test_tracker_condemns_a_lone_record_failing_n_times_in_a_row() -> None:
    t = PoisonTracker(after=2)
    err = ValueError("too large")
    t.failed(TP0, 0, 9, err)
    t.failed(TP0, 0, 9, err)
    t.committed(TP0, 1)  # record 0 alone was fine
    assert t.one_at_a_time(TP0, 1)
    t.failed(TP0, 1, 2, err)
    assert t.condemned(TP0) == {}
    t.failed(TP0, 1, 2, err)
    assert t.condemned(TP0) == {1: "ValueError: too large"}
    t.committed(TP0, 2)  # its dead letter committed
    assert t.condemned(TP0) == {} and t.one_at_a_time(TP0, 2)
    t.committed(TP0, 9)
    assert not t.one_at_a_time(TP0, 9)


def test_only_errors_a_record_can_cause_are_blamed_on_it() -> None:
    for e in (MessageSizeTooLargeError(), TypeError("x"), ValueError("x")):
        assert may_be_the_records(e), e
    for e in (
        KafkaTimeoutError(),
        KafkaConnectionError(),
        RequestTimedOutError(),
        NotEnoughReplicasError(),
        ProducerFenced(),
        ConnectionResetError(),
        TimeoutError(),
    ):
        assert not may_be_the_records(e), e
