"""ITCH 5.0 codec: wire layout against the specification, round trips, fuzzing, framing."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.codecs import itch
from ingest.codecs.errors import DecodeError

DAY_NS = 86_400 * 1_000_000_000

# NASDAQ TotalView-ITCH 5.0 specification, written out independently of the
# codec: message class, total wire length, and the body fields after the common
# 11-byte header (type 1, locate 2, tracking 2, timestamp 6) as (kind, width):
# "i" unsigned big-endian integer, "c" one ASCII char, "a" space-padded alpha.
SPEC: dict[bytes, tuple[type[Any], int, list[tuple[str, int]]]] = {
    b"S": (itch.SystemEvent, 12, [("c", 1)]),
    b"R": (
        itch.StockDirectory,
        39,
        [
            ("a", 8),  # stock
            ("c", 1),  # market category
            ("c", 1),  # financial status indicator
            ("i", 4),  # round lot size
            ("c", 1),  # round lots only
            ("c", 1),  # issue classification
            ("a", 2),  # issue sub-type
            ("c", 1),  # authenticity
            ("c", 1),  # short sale threshold indicator
            ("c", 1),  # IPO flag
            ("c", 1),  # LULD reference price tier
            ("c", 1),  # ETP flag
            ("i", 4),  # ETP leverage factor
            ("c", 1),  # inverse indicator
        ],
    ),
    b"H": (itch.StockTradingAction, 25, [("a", 8), ("c", 1), ("c", 1), ("a", 4)]),
    b"Y": (itch.RegShoRestriction, 20, [("a", 8), ("c", 1)]),
    b"L": (
        itch.MarketParticipantPosition,
        26,
        [("a", 4), ("a", 8), ("c", 1), ("c", 1), ("c", 1)],
    ),
    b"V": (itch.MwcbDeclineLevel, 35, [("i", 8), ("i", 8), ("i", 8)]),
    b"W": (itch.MwcbStatus, 12, [("c", 1)]),
    b"K": (itch.IpoQuotingPeriodUpdate, 28, [("a", 8), ("i", 4), ("c", 1), ("i", 4)]),
    b"J": (itch.LuldAuctionCollar, 35, [("a", 8), ("i", 4), ("i", 4), ("i", 4), ("i", 4)]),
    b"h": (itch.OperationalHalt, 21, [("a", 8), ("c", 1), ("c", 1)]),
    b"A": (itch.AddOrder, 36, [("i", 8), ("c", 1), ("i", 4), ("a", 8), ("i", 4)]),
    b"F": (
        itch.AddOrderMpid,
        40,
        [("i", 8), ("c", 1), ("i", 4), ("a", 8), ("i", 4), ("a", 4)],
    ),
    b"E": (itch.OrderExecuted, 31, [("i", 8), ("i", 4), ("i", 8)]),
    b"C": (
        itch.OrderExecutedWithPrice,
        36,
        [("i", 8), ("i", 4), ("i", 8), ("c", 1), ("i", 4)],
    ),
    b"X": (itch.OrderCancel, 23, [("i", 8), ("i", 4)]),
    b"D": (itch.OrderDelete, 19, [("i", 8)]),
    b"U": (itch.OrderReplace, 35, [("i", 8), ("i", 8), ("i", 4), ("i", 4)]),
    b"P": (
        itch.Trade,
        44,
        [("i", 8), ("c", 1), ("i", 4), ("a", 8), ("i", 4), ("i", 8)],
    ),
    b"Q": (itch.CrossTrade, 40, [("i", 8), ("a", 8), ("i", 4), ("i", 8), ("c", 1)]),
    b"B": (itch.BrokenTrade, 19, [("i", 8)]),
    b"I": (
        itch.Noii,
        50,
        [
            ("i", 8),  # paired shares
            ("i", 8),  # imbalance shares
            ("c", 1),  # imbalance direction
            ("a", 8),  # stock
            ("i", 4),  # far price
            ("i", 4),  # near price
            ("i", 4),  # current reference price
            ("c", 1),  # cross type
            ("c", 1),  # price variation indicator
        ],
    ),
    b"N": (itch.RetailInterest, 20, [("a", 8), ("c", 1)]),
    b"O": (
        itch.DlcrPriceDiscovery,
        48,
        [
            ("a", 8),  # stock
            ("c", 1),  # open eligibility status
            ("i", 4),  # minimum allowable price
            ("i", 4),  # maximum allowable price
            ("i", 4),  # near execution price
            ("i", 8),  # near execution time
            ("i", 4),  # lower price range collar
            ("i", 4),  # upper price range collar
        ],
    ),
}
TYPES = sorted(SPEC)
SIDED = {b"A", b"F", b"P"}  # side must be B or S; the decoder rejects anything else

PRINTABLE = "".join(chr(c) for c in range(32, 127))


def spec_pack(t: bytes, locate: int, tracking: int, ts: int, body: list[Any]) -> bytes:
    """Wire bytes built straight from the SPEC table (independent of the codec)."""
    out = bytearray(t)
    out += locate.to_bytes(2, "big") + tracking.to_bytes(2, "big") + ts.to_bytes(6, "big")
    for (kind, width), v in zip(SPEC[t][2], body, strict=True):
        if kind == "i":
            out += v.to_bytes(width, "big")
        elif kind == "c":
            out += v.encode("ascii")
        else:
            out += v.encode("ascii").ljust(width, b" ")
    return bytes(out)


def field_strategy(t: bytes, name: str, kind: str, width: int) -> st.SearchStrategy[Any]:
    if kind == "i":
        return st.integers(0, 2 ** (8 * width) - 1)
    if kind == "c":
        if t in SIDED and name == "side":
            return st.sampled_from("BS")
        return st.sampled_from(PRINTABLE)
    return st.text(alphabet=PRINTABLE, max_size=width).map(lambda s: s.rstrip(" "))


def message_strategy(t: bytes) -> st.SearchStrategy[tuple[Any, ...]]:
    cls, _, fields = SPEC[t]
    names = cls._fields[3:]
    return st.tuples(
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.integers(0, DAY_NS - 1),
        *(field_strategy(t, n, k, w) for n, (k, w) in zip(names, fields, strict=True)),
    )


# A fixed valid example per type, for truncation tests.
def example(t: bytes) -> bytes:
    cls, _, fields = SPEC[t]
    body: list[Any] = []
    for name, (kind, width) in zip(cls._fields[3:], fields, strict=True):
        if kind == "i":
            body.append(int.from_bytes(bytes(range(1, width + 1)), "big"))
        elif kind == "c":
            body.append("B" if name == "side" else "Y")
        else:
            body.append("ZXY"[:width])
    return spec_pack(t, 0x0102, 0x0304, 34_200_000_000_001, body)


# --- lengths and layout ------------------------------------------------------


def test_spec_covers_all_23_types() -> None:
    assert len(SPEC) == 23
    assert set(itch.MESSAGE_LENGTHS) == set(SPEC)


@pytest.mark.parametrize("t", TYPES, ids=[t.decode() for t in TYPES])
def test_message_length_matches_spec(t: bytes) -> None:
    cls, length, fields = SPEC[t]
    # the table itself must add up to the published length
    assert 11 + sum(w for _, w in fields) == length
    assert len(cls._fields) == 3 + len(fields)
    assert itch.MESSAGE_LENGTHS[t] == length
    assert len(example(t)) == length


def test_add_order_hand_built_bytes() -> None:
    ts = 34_200_123_456_789  # 09:30:00.123456789, needs more than 32 bits
    raw = (
        b"A"
        + b"\x01\x02"  # locate 258 (513 if read little-endian)
        + b"\x00\x07"  # tracking 7
        + ts.to_bytes(6, "big")
        + bytes.fromhex("0102030405060708")  # order ref
        + b"S"
        + (300).to_bytes(4, "big")
        + b"AAPL    "
        + (1_850_100).to_bytes(4, "big")  # $185.0100
    )
    assert len(raw) == 36
    msg = itch.decode(raw)
    assert msg == itch.AddOrder(
        locate=258,
        tracking=7,
        timestamp=ts,
        order_ref=0x0102030405060708,
        side="S",
        shares=300,
        stock="AAPL",
        price_e4=1_850_100,
    )
    assert type(msg) is itch.AddOrder
    assert itch.message_type(msg) == b"A"
    assert itch.encode(msg) == raw


def test_timestamp_high_bytes() -> None:
    # Every one of the 6 timestamp bytes matters.
    ts = 0x4E_12_34_56_78_9A  # < 86_400e9
    assert ts < DAY_NS
    raw = b"S" + b"\x00\x00\x00\x01" + ts.to_bytes(6, "big") + b"O"
    msg = itch.decode(raw)
    assert msg == itch.SystemEvent(0, 1, ts, "O")


# --- round trip -----------------------------------------------------------


@pytest.mark.parametrize("t", TYPES, ids=[t.decode() for t in TYPES])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_every_type(t: bytes, data: st.DataObject) -> None:
    cls = SPEC[t][0]
    values = data.draw(message_strategy(t))
    msg = cls(*values)
    wire = itch.encode(msg)
    assert wire == spec_pack(t, values[0], values[1], values[2], list(values[3:]))
    assert len(wire) == SPEC[t][1]
    back = itch.decode(wire)
    assert type(back) is cls
    assert back == msg


# --- errors ---------------------------------------------------------------

KNOWN_REASONS = {
    "empty",
    "unknown_type",
    "truncated",
    "length_mismatch",
    "bad_side",
    "bad_timestamp",
}


def _decode_or_error(buf: bytes) -> None:
    try:
        msg = itch.decode(buf)
    except DecodeError as e:
        assert e.reason in KNOWN_REASONS
        return
    assert itch.message_type(msg) == buf[:1]
    assert len(buf) == SPEC[buf[:1]][1]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_arbitrary_bytes(buf: bytes) -> None:
    _decode_or_error(buf)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(TYPES).flatmap(
        lambda t: st.binary(min_size=SPEC[t][1] - 2, max_size=SPEC[t][1]).map(lambda b: t + b)
    )
)
def test_fuzz_known_type_near_length(buf: bytes) -> None:
    # Exercise the unpack path (right type byte, length at or near the spec's).
    _decode_or_error(buf)


@pytest.mark.parametrize("t", TYPES, ids=[t.decode() for t in TYPES])
def test_truncated(t: bytes) -> None:
    raw = example(t)
    itch.decode(raw)  # the full message is valid
    for cut in range(1, len(raw)):
        with pytest.raises(DecodeError) as ei:
            itch.decode(raw[:-cut])
        assert ei.value.reason == "truncated", (t, cut)
    with pytest.raises(DecodeError) as ei:
        itch.decode(raw[:0])
    assert ei.value.reason == "empty"


@pytest.mark.parametrize("t", TYPES, ids=[t.decode() for t in TYPES])
def test_overlong(t: bytes) -> None:
    with pytest.raises(DecodeError) as ei:
        itch.decode(example(t) + b"\x00")
    assert ei.value.reason == "length_mismatch"


@pytest.mark.parametrize("b", [b"\x00", b"a", b"Z", b"z", b"\xff", b"G"])
def test_unknown_type(b: bytes) -> None:
    with pytest.raises(DecodeError) as ei:
        itch.decode(b + bytes(35))
    assert ei.value.reason == "unknown_type"


def test_bad_side_and_timestamp() -> None:
    add = itch.AddOrder(1, 0, 1, 1, "B", 100, "AAPL", 10000)
    raw = itch.encode(add)
    with pytest.raises(DecodeError) as ei:
        itch.decode(raw[:19] + b"X" + raw[20:])
    assert ei.value.reason == "bad_side"
    late = raw[:5] + DAY_NS.to_bytes(6, "big") + raw[11:]
    with pytest.raises(DecodeError) as ei:
        itch.decode(late)
    assert ei.value.reason == "bad_timestamp"
    last = raw[:5] + (DAY_NS - 1).to_bytes(6, "big") + raw[11:]
    assert itch.decode(last).timestamp == DAY_NS - 1


def test_decode_error_is_value_error() -> None:
    assert itch.DecodeError is DecodeError
    assert issubclass(DecodeError, ValueError)


# --- framing ----------------------------------------------------------------


def test_frame_prefix() -> None:
    assert itch.frame(b"abc") == b"\x00\x03abc"
    p = bytes(300)
    assert itch.frame(p)[:2] == struct.pack(">H", 300)


def _payloads() -> list[bytes]:
    # Frames whose length is not their type's are desynchronised input:
    # tests/test_itch_framing.py covers those.
    return [example(t) for t in TYPES] * 3


def _write(path: Path, data: bytes, gz: bool) -> None:
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_iter_frames(tmp_path: Path, gz: bool, chunk: int) -> None:
    payloads = _payloads()
    path = tmp_path / ("day.itch.gz" if gz else "day.itch")
    _write(path, b"".join(itch.frame(p) for p in payloads), gz)
    if gz:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    with itch.open_itch_file(path) as f:
        got = list(itch.iter_frames(f, chunk_size=chunk))
    assert got == payloads


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
@pytest.mark.parametrize("cut", [1, 30, 45])  # payload end, payload start, inside prefix
def test_iter_frames_truncated_tail(tmp_path: Path, gz: bool, chunk: int, cut: int) -> None:
    payloads = [example(b"A"), example(b"P")]  # 36 and 44 bytes: frames of 38 and 46
    data = b"".join(itch.frame(p) for p in payloads)
    path = tmp_path / "cut.itch"
    _write(path, data[:-cut], gz)
    got: list[bytes] = []
    with itch.open_itch_file(path) as f, pytest.raises(itch.SourceError, match=r"@ byte 38\b"):
        for p in itch.iter_frames(f, chunk_size=chunk):
            got.append(p)
    assert got == payloads[:1]


def test_iter_frames_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.itch"
    path.write_bytes(b"")
    with itch.open_itch_file(path) as f:
        assert list(itch.iter_frames(f)) == []
