"""The synthetic ITCH day: determinism, shape of the day, and a consistent book."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from decimal import Decimal
from typing import Any

import orjson
import pytest

from core import sessions
from ingest.codecs import itch
from ingest.keys import symbol_key
from ingest.normalize import Normalizer
from ingest.replay.source import RawMessage
from ingest.replay.synthetic import SyntheticDay, symbol_names
from ingest.ticks import parse_tick

NS = 1_000_000_000
SYMBOLS = 3
RATE = 0.2


def digest(msgs: Any, n: int) -> str:
    h = hashlib.sha256()
    for m in itertools.islice(msgs, n):
        h.update(m.ts_ns.to_bytes(8, "big"))
        h.update(m.key or b"-")
        h.update(len(m.payload).to_bytes(2, "big") + m.payload)
    return h.hexdigest()


def test_same_seed_same_bytes() -> None:
    a = digest(iter(SyntheticDay(4, seed=7, rate=0.5)), 3000)
    b = digest(iter(SyntheticDay(4, seed=7, rate=0.5)), 3000)
    assert a == b


def test_different_seed_different_bytes() -> None:
    a = digest(iter(SyntheticDay(4, seed=7, rate=0.5)), 3000)
    b = digest(iter(SyntheticDay(4, seed=8, rate=0.5)), 3000)
    assert a != b


def test_reiterating_same_instance_same_bytes() -> None:
    day = SyntheticDay(2, seed=3, rate=0.5)
    assert digest(iter(day), 500) == digest(iter(day), 500)


def test_symbol_names_distinct_and_stable() -> None:
    names = symbol_names(200, 5)
    assert len(set(names)) == 200
    assert names == symbol_names(200, 5)
    assert all(n.isalpha() and n.isupper() and 2 <= len(n) <= 4 for n in names)


@pytest.mark.parametrize("kw", [{"symbols": 0}, {"rate": 0}, {"rate": -1.0}])
def test_bad_params(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SyntheticDay(**kw)


class Day:
    def __init__(self, close: int, rate: float) -> None:
        self.close = close
        self.msgs: list[RawMessage] = list(SyntheticDay(SYMBOLS, seed=11, rate=rate, close=close))
        self.decoded = [itch.decode(m.payload) for m in self.msgs]
        self.norm = Normalizer()
        self.ticks: list[dict[str, Any]] = []
        for m in self.msgs:
            self.norm.on_itch(m.payload, "2024-03-04", 0, self.ticks)

    def count(self, start: float, end: float, types: bytes = b"AFEXCDUP") -> float:
        """Order-flow messages per second in [start, end) (seconds since midnight)."""
        n = sum(
            1
            for m in self.msgs
            if start * NS <= m.ts_ns < end * NS and m.payload[:1] in [bytes([t]) for t in types]
        )
        return n / (end - start)


@pytest.fixture(scope="module")
def day() -> Day:
    return Day(sessions.CLOSE, RATE)


@pytest.fixture(scope="module")
def early() -> Day:
    return Day(sessions.EARLY_CLOSE, 0.05)


def test_timestamps_non_decreasing_and_match_payload(day: Day) -> None:
    ts = [m.ts_ns for m in day.msgs]
    assert all(a <= b for a, b in itertools.pairwise(ts))
    assert ts[0] == sessions.PRE_MARKET_START * NS
    assert ts[-1] == sessions.AFTER_HOURS_END * NS
    names: dict[int, str] = {}
    for m, d in zip(day.msgs, day.decoded, strict=True):
        assert d.timestamp == m.ts_ns
        assert m.codec == "itch"
        if isinstance(d, itch.StockDirectory):
            names[d.locate] = d.stock
        if isinstance(d, itch.SystemEvent):
            assert m.key is None
        else:
            # Keyed like its ticks (co-partitioned); the directory comes first.
            assert m.key == symbol_key(names[d.locate])


def system_events(d: Day) -> list[tuple[str, int]]:
    return [(m.event_code, m.timestamp) for m in d.decoded if isinstance(m, itch.SystemEvent)]


def crosses(d: Day) -> list[itch.CrossTrade]:
    return [m for m in d.decoded if isinstance(m, itch.CrossTrade)]


def test_system_events(day: Day) -> None:
    pre, close, end = sessions.PRE_MARKET_START * NS, sessions.CLOSE * NS, 20 * 3600 * NS
    assert system_events(day) == [
        ("O", pre),
        ("S", pre),
        ("Q", sessions.OPEN * NS),
        ("M", close),
        ("E", end),
        ("C", end),
    ]


def test_directory_first(day: Day) -> None:
    dirs = [m for m in day.decoded if isinstance(m, itch.StockDirectory)]
    assert sorted(m.locate for m in dirs) == list(range(1, SYMBOLS + 1))
    first_order = next(
        i for i, m in enumerate(day.decoded) if isinstance(m, itch.AddOrder | itch.AddOrderMpid)
    )
    last_dir = max(i for i, m in enumerate(day.decoded) if isinstance(m, itch.StockDirectory))
    assert last_dir < first_order


def test_crosses(day: Day) -> None:
    cs = crosses(day)
    opens = [c for c in cs if c.cross_type == "O"]
    closes = [c for c in cs if c.cross_type == "C"]
    assert len(opens) == len(closes) == SYMBOLS
    assert len(cs) == 2 * SYMBOLS
    assert {c.timestamp for c in opens} == {sessions.OPEN * NS}
    assert {c.timestamp for c in closes} == {sessions.CLOSE * NS}
    assert {c.locate for c in opens} == {c.locate for c in closes} == set(range(1, SYMBOLS + 1))
    assert all(c.shares > 0 for c in cs)


def test_early_close(early: Day) -> None:
    close = sessions.EARLY_CLOSE * NS
    ev = system_events(early)
    assert [c for c, _ in ev] == ["O", "S", "Q", "M", "E", "C"]
    assert dict(ev)["M"] == close
    closes = [c for c in crosses(early) if c.cross_type == "C"]
    assert len(closes) == SYMBOLS
    assert {c.timestamp for c in closes} == {close}
    assert early.norm.book_errors == {}


def test_rate_shape(day: Day) -> None:
    open_rate = day.count(sessions.OPEN, sessions.OPEN + 600)
    midday = day.count(12 * 3600, 13 * 3600)
    pre = day.count(sessions.PRE_MARKET_START, sessions.OPEN)
    after = day.count(sessions.CLOSE, sessions.AFTER_HOURS_END)
    into_close = day.count(sessions.CLOSE - 600, sessions.CLOSE)
    assert midday > 0
    assert open_rate >= 3 * midday, (open_rate, midday)
    assert into_close >= 2 * midday, (into_close, midday)
    assert pre < midday, (pre, midday)
    assert after < midday, (after, midday)
    # midday is roughly rate * symbols per second
    assert 0.5 * RATE * SYMBOLS < midday < 2 * RATE * SYMBOLS


def test_noii_only_before_crosses(day: Day) -> None:
    noii = [m for m in day.decoded if isinstance(m, itch.Noii)]
    assert noii
    for m in noii:
        t = m.timestamp // NS
        if m.cross_type == "O":
            assert sessions.OPEN - 600 <= t < sessions.OPEN
        else:
            assert m.cross_type == "C"
            assert sessions.CLOSE - 600 <= t < sessions.CLOSE


def test_message_mix(day: Day) -> None:
    types = Counter(m.payload[:1] for m in day.msgs)
    for t in b"AFEXCDUPQIRHS":
        assert types[bytes([t])] > 0, chr(t)


def test_normalizer_consistent(day: Day, early: Day) -> None:
    for d in (day, early):
        assert d.norm.book_errors == {}
        assert d.ticks
        quotes = [t for t in d.ticks if t["kind"] == "quote"]
        assert quotes
        for q in quotes:
            if q["bid_px"] is not None and q["ask_px"] is not None:
                assert Decimal(q["bid_px"]) < Decimal(q["ask_px"]), q
        seqs: dict[str, int] = {}
        for t in d.ticks:
            seqs[t["symbol"]] = seqs.get(t["symbol"], 0) + 1
            assert t["seq"] == seqs[t["symbol"]]
        assert set(seqs) == set(symbol_names(SYMBOLS, 11))


def test_ticks_validate(day: Day) -> None:
    for t in day.ticks[::7]:
        parse_tick(orjson.dumps(t))
