"""Replay sources: ITCH time windows with a snapshot prefix, file sources, parse_hhmm."""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingest.codecs import itch
from ingest.handler.partition import Outputs
from ingest.keys import partition_for
from ingest.normalize import Normalizer
from ingest.replay.source import (
    ItchWindow,
    RawMessage,
    itch_file_source,
    jsonl_source,
    only_symbols,
    parse_hhmm,
    parse_only,
    symbol_key,
)
from ingest.replay.synthetic import SyntheticDay

NS = 1_000_000_000
START = 9 * 3600 + 28 * 60
END = 9 * 3600 + 33 * 60
DAY = "2024-03-04"


@lru_cache(maxsize=4)
def full_day(seed: int) -> tuple[RawMessage, ...]:
    """The synthetic day up to END (the generator is lazy; stop there)."""
    out = []
    for m in SyntheticDay(3, seed=seed, rate=0.5):
        if m.ts_ns >= END * NS:
            break
        out.append(m)
    return tuple(out)


@pytest.mark.parametrize("seed", [1, 2])
def test_window_snapshot_then_live(seed: int) -> None:
    day = full_day(seed)
    win = list(ItchWindow(iter(day), START, END))
    before = [m for m in day if m.ts_ns < START * NS]
    inside = [m for m in day if START * NS <= m.ts_ns < END * NS]
    assert before and inside

    # Reference state: everything before the window through a Normalizer.
    ref = Normalizer()
    for m in before:
        ref.on_itch(m.payload, DAY, 0, [])
    assert ref.books.orders, "live orders at the window start"

    n_snap = len(win) - len(inside)
    snap, live = win[:n_snap], win[n_snap:]
    assert live == inside  # the window's own messages, untouched and in order
    assert all(m.ts_ns == START * NS for m in snap)
    decoded = [itch.decode(m.payload) for m in snap]
    assert all(d.timestamp == START * NS for d in decoded)
    types = [itch.message_type(d) for d in decoded]
    # system events, then directory + trading action per symbol, then the adds
    n_sys = types.count(b"S")
    assert types[:n_sys] == [b"S"] * n_sys
    assert [d.event_code for d in decoded[:n_sys]] == ["O", "S"]  # all seen before 09:28
    n_ref = types.count(b"R") + types.count(b"H")
    assert sorted(types[n_sys : n_sys + n_ref]) == sorted([b"R"] * 3 + [b"H"] * 3)
    adds = decoded[n_sys + n_ref :]
    assert all(isinstance(a, itch.AddOrder) for a in adds)
    assert {a.order_ref: [a.locate, a.side == "B", a.price_e4, a.shares] for a in adds} == (
        ref.books.orders
    )
    for a in adds:
        assert a.stock == ref.directory[a.locate]
    for m, d in zip(snap, decoded, strict=True):
        want = None if isinstance(d, itch.SystemEvent) else symbol_key(ref.directory[d.locate])
        assert m.key == want
    assert win[-1].ts_ns < END * NS


@pytest.mark.parametrize("seed", [1, 2])
def test_window_through_normalizer(seed: int) -> None:
    day = full_day(seed)
    w = Normalizer()
    ticks: list[dict[str, Any]] = []
    for m in ItchWindow(iter(day), START, END):
        w.on_itch(m.payload, DAY, 0, ticks)
    assert w.book_errors == {}
    assert ticks
    # the windowed book ends exactly where the full day's does
    full = Normalizer()
    for m in day:
        full.on_itch(m.payload, DAY, 0, [])
    assert w.books.orders == full.books.orders
    for loc in full.books.books:
        assert w.books.book(loc).top() == full.books.book(loc).top()
    assert w.directory == full.directory


def test_window_without_start_is_a_prefix() -> None:
    day = full_day(1)
    end = 9 * 3600
    got = list(ItchWindow(iter(day), None, end))
    assert got == [m for m in day if m.ts_ns < end * NS]
    assert list(ItchWindow(iter(day), None, None)) == list(day)


def test_window_start_after_data_yields_snapshot_only() -> None:
    day = full_day(1)
    got = list(ItchWindow(iter(day), 23 * 3600, None))
    assert got
    assert all(m.ts_ns == 23 * 3600 * NS for m in got)
    n = Normalizer()
    full = Normalizer()
    for m in got:
        n.on_itch(m.payload, DAY, 0, [])
    for m in day:
        full.on_itch(m.payload, DAY, 0, [])
    assert n.book_errors == {}
    assert n.books.orders == full.books.orders


def test_window_keeps_undecodable_messages() -> None:
    good = itch.encode(itch.SystemEvent(0, 1, START * NS + 5, "Q"))
    src = [
        RawMessage(10, None, b"\xffjunk", "itch"),
        RawMessage(START * NS + 1, b"", b"\xffjunk", "itch"),
        RawMessage(START * NS + 5, None, good, "itch"),
    ]
    got = list(ItchWindow(src, START, END))
    assert got == src[1:]  # junk before the window is dropped silently; inside it is kept


@pytest.mark.parametrize(
    ("s", "sec"),
    [
        ("09:30", 34200),
        ("9:30", 34200),
        ("9:30:15", 34215),
        ("00:00", 0),
        ("23:59:59", 86399),
        ("16:00", 57600),
    ],
)
def test_parse_hhmm_ok(s: str, sec: int) -> None:
    assert parse_hhmm(s) == sec


@pytest.mark.parametrize(
    "s", ["25:00", "9h30", "", "9", "09:60", "09:30:60", "-1:00", "09:30:00:00", "a:b", " 9:30"]
)
def test_parse_hhmm_rejects(s: str) -> None:
    with pytest.raises(ValueError) as ei:
        parse_hhmm(s)
    assert repr(s) in str(ei.value)


@pytest.mark.parametrize("s", ["24:30", "24:00:01"])
def test_parse_hhmm_rejects_past_midnight(s: str) -> None:
    with pytest.raises(ValueError):
        parse_hhmm(s)


def test_jsonl_source_keeps_invalid_lines(tmp_path: Path) -> None:
    trade = {
        "type": "trade",
        "symbol": "BTC-USD",
        "venue": "XCOI",
        "ts": 1732541400123456789,
        "price": "97012.35",
        "size": "0.015",
        "side": "B",
        "trade_id": "1",
    }
    quote_iso = {
        "type": "quote",
        "symbol": "ETH-USD",
        "venue": "XCOI",
        "ts": "2024-11-25T14:30:00.5Z",
        "bid_px": "1",
    }
    lines = [
        orjson.dumps(trade),
        b"not json at all",
        b"",
        orjson.dumps({"type": "trade", "symbol": "BTC-USD"}),  # invalid: missing fields
        orjson.dumps(quote_iso),
        b"[1, 2, 3]",
        orjson.dumps({"symbol": "SOL-USD", "ts": "garbage"}),
        orjson.dumps({"symbol": 5, "ts": True}),
    ]
    path = tmp_path / "feed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    got = list(jsonl_source(path))
    assert [m.payload for m in got] == [ln for ln in lines if ln]
    assert all(m.codec == "json" for m in got)
    assert [m.key for m in got] == [
        b"BTC-USD",
        b"",
        b"BTC-USD",
        b"ETH-USD",
        b"",
        b"SOL-USD",
        b"",
    ]
    t1 = 1732541400123456789
    t2 = 1732545000500000000
    # lines without a usable ts keep the last one, for pacing
    assert [m.ts_ns for m in got] == [t1, t1, t1, t2, t2, t2, t2]


def test_itch_file_source(tmp_path: Path) -> None:
    t = 4 * 3600 * NS
    msgs = [
        itch.SystemEvent(0, 1, t, "O"),
        itch.AddOrder(258, 2, t + 7, 1, "B", 100, "AAPL", 10_0000),
    ]
    directory = itch.StockDirectory(
        258, 3, t + 8, "AAPL", "Q", "N", 100, "N", "C", "  ", "P", "N", " ", "1", "N", 1, "N"
    )
    payloads = [itch.encode(m) for m in msgs] + [b"A\x01", itch.encode(directory)]
    payloads.append(itch.encode(msgs[1]))
    path = tmp_path / "x.itch.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"".join(itch.frame(p) for p in payloads))
    got = list(itch_file_source(path))
    # The short frame loses the framing: its raw bytes (prefix included) are one record.
    payloads[2] = itch.frame(payloads[2])
    assert [m.payload for m in got] == payloads
    # A stock is keyed by its symbol once its directory message is seen (as its
    # ticks are), by its locate before that.
    assert [m.key for m in got] == [None, b"\x01\x02", b"", b"AAPL", b"AAPL"]
    assert [m.ts_ns for m in got] == [t, t + 7, t + 7, t + 8, t + 7]


def test_only_symbols_keeps_a_subset_and_the_market_wide_messages() -> None:
    day = full_day(1)
    names = {
        d.locate: d.stock.rstrip()
        for m in day
        if m.key is not None and isinstance(d := itch.decode(m.payload), itch.StockDirectory)
    }
    assert len(names) == 3
    keep = sorted(names.values())[:2]
    short = RawMessage(day[-1].ts_ns, b"", b"A\x01", "itch")  # too short for a locate
    got = list(only_symbols([*day, short], parse_only(",".join(keep))))
    kept = {int.from_bytes(m.payload[1:3], "big") for m in got if m.key}
    assert {names[loc] for loc in kept if loc in names} == set(keep)
    assert kept <= {loc for loc, n in names.items() if n in keep}
    dropped = [m for m in day if m.key and m.key.decode() not in keep]
    assert dropped and len(got) == len(day) + 1 - len(dropped)
    # Market-wide messages (system events) and unattributable input stay.
    assert [m for m in day if m.key is None] == [m for m in got if m.key is None]
    assert got[-1] == short


def test_only_symbols_on_json_lines_and_bad_lists() -> None:
    msgs = [
        RawMessage(1, b"BTC-USD", b"{}", "json"),
        RawMessage(2, b"ETH-USD", b"{}", "json"),
        RawMessage(3, b"", b"not json", "json"),
    ]
    got = list(only_symbols(msgs, parse_only("BTC-USD")))
    assert [m.ts_ns for m in got] == [1, 3]
    assert parse_only(None) is None
    with pytest.raises(ValueError, match="comma-separated"):
        parse_only(" , ")


@pytest.mark.slow
@pytest.mark.parametrize(("raw", "ticks"), [(12, 12), (4, 4), (24, 12)])
def test_raw_messages_and_their_ticks_share_a_partition(raw: int, ticks: int) -> None:
    """Co-partitioning: a symbol's ticks go to its raw partition (modulo the ticks
    count), so a transaction for one raw partition writes to one ticks partition."""
    outputs = Outputs("md.ticks", ticks, "md.deadletter")
    norm = Normalizer()
    seen = 0
    for m in ItchWindow(SyntheticDay(30, 3), parse_hhmm("09:28"), parse_hhmm("09:34")):
        out: list[dict[str, Any]] = []
        norm.on_itch(m.payload, "2024-11-25", 0, out)
        for t in out:
            assert m.key is not None
            assert outputs.route(t["symbol"])[0] == partition_for(m.key, raw) % ticks
            seen += 1
    assert seen > 1000
