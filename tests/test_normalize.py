"""Normalizer: ITCH/JSON -> ticks, per-symbol sequencing, snapshot/restore equivalence."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.codecs import itch
from ingest.normalize import Normalizer, midnight_ns
from ingest.replay.source import ItchWindow, parse_hhmm
from ingest.replay.synthetic import SyntheticDay
from ingest.ticks import Quote, Trade, parse_tick

DAY = "2024-03-04"  # EST: local midnight is 05:00 UTC
MIDNIGHT = int(datetime(2024, 3, 4, 5, 0, tzinfo=UTC).timestamp()) * 1_000_000_000
T = 9 * 3600 * 1_000_000_000  # 09:00:00 local, in ns since midnight


def test_midnight_ns_is_new_york_midnight() -> None:
    assert midnight_ns(DAY) == MIDNIGHT
    summer = int(datetime(2024, 7, 1, 4, 0, tzinfo=UTC).timestamp()) * 1_000_000_000
    assert midnight_ns("2024-07-01") == summer  # EDT
    # DST change days: midnight precedes the 02:00 switch
    assert midnight_ns("2024-03-10") == int(
        datetime(2024, 3, 10, 5, 0, tzinfo=UTC).timestamp() * 1_000_000_000
    )
    assert midnight_ns("2024-11-03") == int(
        datetime(2024, 11, 3, 4, 0, tzinfo=UTC).timestamp() * 1_000_000_000
    )


def directory(locate: int, stock: str, ts: int) -> itch.StockDirectory:
    return itch.StockDirectory(
        locate, 0, ts, stock, "Q", "N", 100, "N", "C", "Z", "P", "N", "N", "2", "N", 0, "N"
    )


def quote(sym: str, seq: int, ts: int, bp: Any, bs: Any, ap: Any, asz: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "kind": "quote",
        "symbol": sym,
        "venue": "XNAS",
        "seq": seq,
        "event_ts": MIDNIGHT + ts,
        "recv_ts": 42,
        "bid_px": bp,
        "bid_sz": bs,
        "ask_px": ap,
        "ask_sz": asz,
    }


def trade(
    sym: str, seq: int, ts: int, px: str, sz: str, side: str, tid: str, cross: str = ""
) -> dict[str, Any]:
    return {
        "v": 1,
        "kind": "trade",
        "symbol": sym,
        "venue": "XNAS",
        "seq": seq,
        "event_ts": MIDNIGHT + ts,
        "recv_ts": 42,
        "price": px,
        "size": sz,
        "side": side,
        "trade_id": tid,
        "cross": cross,
    }


def script() -> list[tuple[itch.ItchMessage, list[dict[str, Any]]]]:
    """(message, exactly the ticks it must produce)."""
    a = "AAPL"
    return [
        (itch.SystemEvent(0, 1, T, "O"), []),
        (directory(1, a, T), []),
        (
            itch.AddOrder(1, 2, T + 1, 1, "B", 100, a, 100_0000),
            [quote(a, 1, T + 1, "100.0000", "100", None, None)],
        ),
        (
            itch.AddOrder(1, 3, T + 2, 2, "S", 200, a, 100_0500),
            [quote(a, 2, T + 2, "100.0000", "100", "100.0500", "200")],
        ),
        # worse bid (with MPID): top unchanged, no tick
        (itch.AddOrderMpid(1, 4, T + 3, 3, "B", 50, a, 99_9900, "GSCO"), []),
        # execution against the resting bid: seller is the aggressor
        (
            itch.OrderExecuted(1, 5, T + 4, 1, 40, 11),
            [
                trade(a, 3, T + 4, "100.0000", "40", "S", "11"),
                quote(a, 4, T + 4, "100.0000", "60", "100.0500", "200"),
            ],
        ),
        # execution with price, printable: trades at the message's price
        (
            itch.OrderExecutedWithPrice(1, 6, T + 5, 2, 50, 12, "Y", 100_0600),
            [
                trade(a, 5, T + 5, "100.0600", "50", "B", "12"),
                quote(a, 6, T + 5, "100.0000", "60", "100.0500", "150"),
            ],
        ),
        # non-printable: no trade, but the book still changes
        (
            itch.OrderExecutedWithPrice(1, 7, T + 6, 2, 10, 13, "N", 100_0600),
            [quote(a, 7, T + 6, "100.0000", "60", "100.0500", "140")],
        ),
        # cancel the whole best bid: best recomputed to the next level
        (
            itch.OrderCancel(1, 8, T + 7, 1, 60),
            [quote(a, 8, T + 7, "99.9900", "50", "100.0500", "140")],
        ),
        (
            itch.OrderDelete(1, 9, T + 8, 3),
            [quote(a, 9, T + 8, None, None, "100.0500", "140")],
        ),
        (
            itch.OrderReplace(1, 10, T + 9, 2, 4, 100, 100_0300),
            [quote(a, 10, T + 9, None, None, "100.0300", "100")],
        ),
        # non-cross trade: the side is the resting order's, aggressor is opposite
        (
            itch.Trade(1, 11, T + 10, 0, "B", 300, a, 100_0200, 14),
            [trade(a, 11, T + 10, "100.0200", "300", "S", "14")],
        ),
        (
            itch.Trade(1, 12, T + 11, 0, "S", 5, a, 5, 15),
            [trade(a, 12, T + 11, "0.0005", "5", "B", "15")],
        ),
        (
            itch.CrossTrade(1, 13, T + 12, 1000, a, 100_0250, 16, "O"),
            [trade(a, 13, T + 12, "100.0250", "1000", "", "16", "O")],
        ),
        # a zero-share cross prints nothing
        (itch.CrossTrade(1, 14, T + 13, 0, a, 100_0250, 17, "C"), []),
        # second symbol without a directory message: named by its add; own seq
        (
            itch.AddOrder(2, 15, T + 14, 5, "S", 7, "MSFT", 400_1234),
            [quote("MSFT", 1, T + 14, None, None, "400.1234", "7")],
        ),
        (
            itch.OrderExecuted(2, 16, T + 15, 5, 7, 18),
            [
                trade("MSFT", 2, T + 15, "400.1234", "7", "B", "18"),
                quote("MSFT", 3, T + 15, None, None, None, None),
            ],
        ),
        (
            itch.CrossTrade(2, 17, T + 16, 123, "MSFT", 1_2345_6789, 19, "C"),
            [trade("MSFT", 4, T + 16, "12345.6789", "123", "", "19", "C")],
        ),
        # messages that produce nothing
        (itch.StockTradingAction(1, 18, T + 17, a, "T", " ", ""), []),
        (itch.BrokenTrade(1, 19, T + 18, 14), []),
        (itch.Noii(1, 20, T + 19, 100, 50, "B", a, 1, 2, 3, "O", "L"), []),
        # adds again: seq continues gap-free
        (
            itch.AddOrder(1, 21, T + 20, 6, "B", 10, a, 100_0100),
            [quote(a, 14, T + 20, "100.0100", "10", "100.0300", "100")],
        ),
    ]


def test_scripted_sequence() -> None:
    n = Normalizer()
    all_ticks: list[dict[str, Any]] = []
    for msg, expected in script():
        out: list[dict[str, Any]] = []
        got = n.on_itch(itch.encode(msg), DAY, 42, out)
        assert got == msg
        assert out == expected, msg
        all_ticks.extend(out)
    assert n.book_errors == {}
    # per-symbol seq is 1..n gap-free
    for sym in ("AAPL", "MSFT"):
        seqs = [t["seq"] for t in all_ticks if t["symbol"] == sym]
        assert seqs == list(range(1, len(seqs) + 1))
    assert n.seqs == {"AAPL": 14, "MSFT": 4}
    for t in all_ticks:
        parsed = parse_tick(orjson.dumps(t))
        assert isinstance(parsed, Trade if t["kind"] == "trade" else Quote)
        assert parsed.seq == t["seq"]
        assert parsed.event_ts == t["event_ts"]
        if isinstance(parsed, Trade):
            assert parsed.price == Decimal(t["price"])


def test_book_errors_counted_not_raised() -> None:
    n = Normalizer()
    out: list[dict[str, Any]] = []
    n.on_itch(itch.encode(directory(1, "AAPL", T)), DAY, 0, out)
    n.on_itch(itch.encode(itch.AddOrder(1, 0, T, 1, "B", 100, "AAPL", 10_0000)), DAY, 0, out)
    assert len(out) == 1
    for m in [
        itch.OrderExecuted(1, 0, T + 1, 999, 10, 1),  # unknown order
        itch.OrderCancel(1, 0, T + 2, 998, 10),  # unknown order
        itch.OrderDelete(1, 0, T + 3, 997),  # unknown order
        itch.OrderReplace(1, 0, T + 4, 996, 2, 1, 1),  # unknown order
        itch.AddOrder(1, 0, T + 5, 1, "S", 1, "AAPL", 11_0000),  # duplicate
        itch.OrderDelete(2, 0, T + 6, 1),  # locate mismatch
    ]:
        n.on_itch(itch.encode(m), DAY, 0, out)
    assert len(out) == 1  # no ticks from inconsistent events
    assert n.book_errors == {"unknown_order": 4, "duplicate_order": 1, "locate_mismatch": 1}
    # over-fill: counted, no trade (the fill is inconsistent), the order is gone and
    # the emptied top of book is published at once with the over-fill's timestamp
    n.on_itch(itch.encode(itch.OrderExecuted(1, 0, T + 7, 1, 150, 2)), DAY, 0, out)
    assert n.book_errors["overfill"] == 1
    assert [(t["kind"], t["bid_px"], t["ask_px"], t["seq"]) for t in out[1:]] == [
        ("quote", None, None, 2)
    ]
    assert out[1]["event_ts"] == midnight_ns(DAY) + T + 7
    assert n.books.orders == {}
    # the normalizer keeps working
    out.clear()
    n.on_itch(itch.encode(itch.AddOrder(1, 0, T + 8, 3, "S", 5, "AAPL", 10_0100)), DAY, 0, out)
    assert [(t["kind"], t["bid_px"], t["ask_px"]) for t in out] == [("quote", None, "10.0100")]
    assert out[0]["seq"] == 3  # no seq was consumed by the other failed events
    assert sum(n.book_errors.values()) == 7


def test_decode_error_propagates() -> None:
    n = Normalizer()
    with pytest.raises(itch.DecodeError):
        n.on_itch(b"A" + bytes(10), DAY, 0, [])
    with pytest.raises(itch.DecodeError):
        n.on_itch(b"", DAY, 0, [])


def test_check_feed_seq() -> None:
    n = Normalizer()
    assert n.check_feed_seq(1) == 0
    assert n.check_feed_seq(2) == 0
    assert n.check_feed_seq(3) == 0
    assert n.gaps == 0
    assert n.check_feed_seq(7) == 3
    assert n.gaps == 3
    assert n.check_feed_seq(5) == 0  # late/duplicate: not a gap, not a rewind
    assert n.last_feed_seq == 7
    assert n.check_feed_seq(7) == 0
    assert n.check_feed_seq(8) == 0
    assert n.check_feed_seq(10) == 1
    assert n.gaps == 4
    assert n.last_feed_seq == 10
    # the feed position survives a snapshot
    r = Normalizer.restore(n.snapshot())
    assert r.last_feed_seq == 10
    assert r.check_feed_seq(12) == 1


def test_on_json() -> None:
    n = Normalizer()
    out: list[dict[str, Any]] = []
    n.on_json(
        b'{"type":"trade","symbol":"BTC-USD","venue":"XCOI","ts":1732541400123456789,'
        b'"price":"97012.35","size":"0.015","side":"B","trade_id":"8812734"}',
        5,
        out,
    )
    n.on_json(
        b'{"type":"quote","symbol":"BTC-USD","venue":"XCOI","ts":"2024-11-25T14:30:00.5Z",'
        b'"bid_px":"97012.30","bid_sz":"1.2","ask_px":null}',
        6,
        out,
    )
    assert out == [
        {
            "v": 1,
            "kind": "trade",
            "symbol": "BTC-USD",
            "venue": "XCOI",
            "seq": 1,
            "event_ts": 1732541400123456789,
            "recv_ts": 5,
            "price": "97012.35",
            "size": "0.015",
            "side": "B",
            "trade_id": "8812734",
            "cross": "",
        },
        {
            "v": 1,
            "kind": "quote",
            "symbol": "BTC-USD",
            "venue": "XCOI",
            "seq": 2,
            "event_ts": 1732545000500000000,
            "recv_ts": 6,
            "bid_px": "97012.30",
            "bid_sz": "1.2",
            "ask_px": None,
            "ask_sz": None,
        },
    ]
    for t in out:
        parse_tick(orjson.dumps(t))
    with pytest.raises(itch.DecodeError):
        n.on_json(b'{"type":"trade"}', 0, out)
    assert len(out) == 2


def test_restore_rejects_unknown_version() -> None:
    blob = orjson.loads(Normalizer().snapshot())
    blob["v"] = 2
    with pytest.raises(ValueError):
        Normalizer.restore(orjson.dumps(blob))


# --- snapshot / restore equivalence over synthetic streams -------------------


@lru_cache(maxsize=32)
def window_payloads(seed: int, symbols: int) -> tuple[bytes, ...]:
    day = SyntheticDay(symbols=symbols, seed=seed, rate=0.5)
    win = ItchWindow(day, parse_hhmm("09:28"), parse_hhmm("09:33"))
    return tuple(m.payload for m in win)


def run(n: Normalizer, payloads: tuple[bytes, ...]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in payloads:
        n.on_itch(p, DAY, 0, out)
    return out


def test_scripted_restore_at_every_point() -> None:
    payloads = tuple(itch.encode(m) for m, _ in script())
    full_n = Normalizer()
    full = run(full_n, payloads)
    for k in range(len(payloads) + 1):
        first = Normalizer()
        a = run(first, payloads[:k])
        restored = Normalizer.restore(first.snapshot())
        b = run(restored, payloads[k:])
        assert a + b == full, k
        assert restored.snapshot() == full_n.snapshot()


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    symbols=st.integers(2, 3),
    frac=st.floats(0.0, 1.0),
    frac2=st.floats(0.0, 1.0),
)
def test_snapshot_restore_equivalence(seed: int, symbols: int, frac: float, frac2: float) -> None:
    payloads = window_payloads(seed, symbols)
    full_n = Normalizer()
    full = run(full_n, payloads)
    assert full, "the window must produce ticks"
    assert full_n.book_errors == {}

    k1 = int(frac * len(payloads))
    k2 = k1 + int(frac2 * (len(payloads) - k1))
    n1 = Normalizer()
    part1 = run(n1, payloads[:k1])
    snap1 = n1.snapshot()
    n2 = Normalizer.restore(snap1)
    assert n2.snapshot() == snap1  # restore loses nothing
    part2 = run(n2, payloads[k1:k2])
    n3 = Normalizer.restore(n2.snapshot())  # a second move
    part3 = run(n3, payloads[k2:])
    assert part1 + part2 + part3 == full
    assert n3.snapshot() == full_n.snapshot()
    assert n3.book_errors == {} and n2.book_errors == {}


# --- one trading day after another -------------------------------------------------------

NEXT = "2024-03-05"
NEXT_MIDNIGHT = MIDNIGHT + 86_400 * 1_000_000_000  # no clock change between the two


def test_a_later_day_starts_the_state_afresh() -> None:
    """A handler runs on into the next day: yesterday's resting orders must not price
    today's quotes, and each symbol's ticks are numbered from 1 again, so a day's ticks
    are the same whether or not the handler saw the day before."""
    payloads = [itch.encode(m) for m, _ in script()]
    n = Normalizer()
    first = []
    for p in payloads:
        n.on_itch(p, DAY, 42, first)
    assert n.books.books, "the script leaves orders resting overnight"
    again: list[dict[str, Any]] = []
    for p in payloads:
        n.on_itch(p, NEXT.encode(), 42, again)
    fresh: list[dict[str, Any]] = []
    m = Normalizer()
    for p in payloads:
        m.on_itch(p, NEXT.encode(), 42, fresh)
    assert again == fresh
    assert [t["seq"] for t in again] == [t["seq"] for t in first]
    assert {t["event_ts"] - NEXT_MIDNIGHT for t in again} == {
        t["event_ts"] - MIDNIGHT for t in first
    }
    assert n.snapshot() == m.snapshot()


def test_a_record_of_an_earlier_day_is_refused_and_changes_nothing() -> None:
    payloads = [itch.encode(m) for m, _ in script()]
    n = Normalizer()
    for p in payloads[:4]:
        n.on_itch(p, NEXT, 42, [])
    before = n.snapshot()
    with pytest.raises(itch.DecodeError) as e:
        n.on_itch(payloads[4], DAY, 42, [])
    assert e.value.reason == "previous_day"
    assert n.snapshot() == before
    n.on_itch(payloads[4], NEXT, 42, [])  # today's records go on as before


def test_the_day_survives_a_snapshot() -> None:
    payloads = [itch.encode(m) for m, _ in script()]
    n = Normalizer()
    for p in payloads[:3]:
        n.on_itch(p, NEXT, 42, [])
    r = Normalizer.restore(n.snapshot())
    with pytest.raises(itch.DecodeError):
        r.on_itch(payloads[3], DAY, 42, [])
    # A snapshot from before days were kept takes the day of its next record.
    old = orjson.loads(n.snapshot())
    del old["day"]
    legacy = Normalizer.restore(orjson.dumps(old))
    assert legacy.day is None
    out: list[dict[str, Any]] = []
    legacy.on_itch(payloads[3], NEXT, 42, out)
    assert out and legacy.books.books, "the restored state is kept, not started afresh"
