"""Property tests of the handler's per-record path: no record can stop a partition.

Random and mutated payloads and headers for every codec go through
``PartitionWorker.transform`` with a real Normalizer (no broker needed): nothing
raises, every record is applied or dead-lettered exactly once, the output
serialises, and a restore's silent replay of the same records ends in the same
state and fails the same records the same way.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.constants import HDR_CODEC, HDR_DATE, HDR_SEQ
from ingest.codecs import itch
from ingest.handler.partition import Batch, DeadLetter, Outputs, PartitionWorker
from ingest.normalize import Normalizer
from ingest.ticks import parse_tick

TP = TopicPartition("md.raw", 0)
DAY = b"2024-11-25"
DAY_NS = 86_400 * 1_000_000_000
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _worker() -> PartitionWorker:
    return PartitionWorker(TP, "g", Outputs("md.ticks", 4, "md.deadletter"), None, 5.0)


def _record(offset: int, value: bytes | None, headers: list[tuple[str, bytes]]) -> Any:
    return ConsumerRecord(
        topic=TP.topic,
        partition=TP.partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=None,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=len(value or b""),
        headers=headers,
    )


# ITCH ------------------------------------------------------------------------------------

_small = st.integers(0, 3)
_refs = st.integers(1, 6)
_shares = st.integers(0, 2**32 - 1)
_price = st.integers(0, 2**32 - 1)
_ts = st.integers(0, DAY_NS - 1)
_side = st.sampled_from("BS")
_stock = st.sampled_from(["AAPL", "MSFT", "A", "ZVZZT"])


def _sensible() -> st.SearchStrategy[bytes]:
    """Well-formed order-book traffic over a few symbols and orders, so books move."""
    return st.one_of(
        st.builds(
            lambda loc, ts, s: itch.encode(
                itch.StockDirectory(
                    loc, 0, ts, s, "Q", "N", 100, "N", "C", "Z", "P", "N", "N", "1", "N", 0, "N"
                )
            ),
            _small,
            _ts,
            _stock,
        ),
        st.builds(
            lambda loc, ts, ref, side, n, s, px: itch.encode(
                itch.AddOrder(loc, 0, ts, ref, side, n, s, px)
            ),
            _small,
            _ts,
            _refs,
            _side,
            _shares,
            _stock,
            _price,
        ),
        st.builds(
            lambda loc, ts, ref, n, m: itch.encode(itch.OrderExecuted(loc, 0, ts, ref, n, m)),
            _small,
            _ts,
            _refs,
            _shares,
            st.integers(0, 2**64 - 1),
        ),
        st.builds(
            lambda loc, ts, ref, n, m, pr, px: itch.encode(
                itch.OrderExecutedWithPrice(loc, 0, ts, ref, n, m, pr, px)
            ),
            _small,
            _ts,
            _refs,
            _shares,
            st.integers(0, 2**64 - 1),
            st.sampled_from("YN"),
            _price,
        ),
        st.builds(
            lambda loc, ts, ref, n: itch.encode(itch.OrderCancel(loc, 0, ts, ref, n)),
            _small,
            _ts,
            _refs,
            _shares,
        ),
        st.builds(
            lambda loc, ts, ref: itch.encode(itch.OrderDelete(loc, 0, ts, ref)),
            _small,
            _ts,
            _refs,
        ),
        st.builds(
            lambda loc, ts, a, b, n, px: itch.encode(itch.OrderReplace(loc, 0, ts, a, b, n, px)),
            _small,
            _ts,
            _refs,
            _refs,
            _shares,
            _price,
        ),
        st.builds(
            lambda loc, ts, ref, side, n, s, px, m: itch.encode(
                itch.Trade(loc, 0, ts, ref, side, n, s, px, m)
            ),
            _small,
            _ts,
            _refs,
            _side,
            _shares,
            _stock,
            _price,
            st.integers(0, 2**64 - 1),
        ),
        st.builds(
            lambda loc, ts, n, s, px, m, c: itch.encode(
                itch.CrossTrade(loc, 0, ts, n, s, px, m, c)
            ),
            _small,
            _ts,
            st.integers(0, 2**64 - 1),
            _stock,
            _price,
            st.integers(0, 2**64 - 1),
            st.sampled_from("OCHI"),
        ),
    )


@st.composite
def _any_type(draw: st.DrawFn) -> bytes:
    """A message of any ITCH type with random field bytes (sides, times, text)."""
    t = draw(st.sampled_from(sorted(itch.MESSAGE_LENGTHS)))
    return t + draw(
        st.binary(min_size=itch.MESSAGE_LENGTHS[t] - 1, max_size=itch.MESSAGE_LENGTHS[t] - 1)
    )


@st.composite
def _mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    b = bytearray(draw(base))
    how = draw(st.sampled_from(["truncate", "extend", "flip", "retype", "none"]))
    if how == "truncate":
        del b[draw(st.integers(0, len(b))) :]
    elif how == "extend":
        b += draw(st.binary(min_size=1, max_size=8))
    elif how == "flip" and b:
        i = draw(st.integers(0, len(b) - 1))
        b[i] = draw(st.integers(0, 255))
    elif how == "retype" and b:
        b[0] = draw(st.integers(0, 255))
    return bytes(b)


_itch_payload = st.one_of(
    _sensible(),
    _sensible(),
    _any_type(),
    _mutated(st.one_of(_sensible(), _any_type())),
    st.binary(),
)

# JSON ------------------------------------------------------------------------------------

_huge = st.one_of(
    st.integers(),
    st.integers(2**63 - 2, 2**70),
    st.integers(-(2**70), 0),
    st.floats(allow_nan=False),
    st.text(max_size=12),
)


@st.composite
def _json_dict(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["trade", "quote"]))
    d: dict[str, Any] = {
        "type": kind,
        "symbol": draw(st.one_of(st.sampled_from(["BTC-USD", "ETH-USD"]), st.text(max_size=70))),
        "venue": draw(st.one_of(st.just("XCOI"), st.text(max_size=20))),
        "ts": draw(
            st.one_of(
                st.integers(0, 2**63 - 1),
                _huge,
                st.sampled_from(
                    ["2024-11-25T14:30:00.5Z", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z"]
                ),
            )
        ),
    }
    num = st.one_of(
        st.sampled_from(["97012.35", "0.015", "1e999999", "-1", "0", "NaN"]), _huge, st.none()
    )
    if kind == "trade":
        d |= {
            "price": draw(num),
            "size": draw(num),
            "side": draw(st.sampled_from(["B", "S", "", "X"])),
            "trade_id": draw(st.one_of(st.just("1"), st.text(max_size=70))),
        }
    else:
        d |= {k: draw(num) for k in ("bid_px", "bid_sz", "ask_px", "ask_sz")}
    for k in draw(st.lists(st.sampled_from(sorted(d)), max_size=2)):
        d.pop(k, None)
    return d


def _dumps(d: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(d)
    except TypeError:  # an integer orjson cannot write: write it as text
        return repr(d).replace("'", '"').encode()


_json_payload = st.one_of(
    _json_dict().map(_dumps),
    _mutated(_json_dict().map(_dumps)),
    st.binary(max_size=200),
    st.just(
        b'{"type":"trade","symbol":"A","venue":"X","ts":'
        + b"9" * 40
        + b',"price":"1","size":"1","trade_id":"1"}'
    ),
)

# Headers ---------------------------------------------------------------------------------

_date = st.one_of(
    st.just(DAY),
    st.just(DAY),
    st.none(),
    st.sampled_from([b"9999-12-31", b"0001-01-01", b"2024-02-30", b"20241125", b"", b"\xff\xfe"]),
    st.binary(max_size=12),
    st.text(max_size=12).map(str.encode),
)
_seq = st.one_of(
    st.none(),
    st.integers(-5, 2**80).map(lambda n: str(n).encode()),
    st.binary(max_size=8),
    st.just(b"9" * 5000),
)


@st.composite
def _record_strategy(draw: st.DrawFn, offset: int) -> Any:
    codec = draw(st.one_of(st.sampled_from([b"itch", b"json", None]), st.binary(max_size=6)))
    headers: list[tuple[str, Any]] = []
    if codec is not None:
        headers.append((HDR_CODEC, codec))
    date = draw(_date)
    if date is not None:
        headers.append((HDR_DATE, date))
    seq = draw(_seq)
    if seq is not None:
        headers.append((HDR_SEQ, seq))
    # Kafka allows a header without a value, and the same header twice.
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from([HDR_CODEC, HDR_DATE, HDR_SEQ, "other"]))
        headers.insert(
            draw(st.integers(0, len(headers))), (name, draw(st.none() | st.binary(max_size=4)))
        )
    is_json = codec == b"json"
    value = draw(_json_payload if is_json else _itch_payload)
    if draw(st.integers(0, 20)) == 0:
        value = None  # a tombstone
    return _record(offset, value, headers)


@st.composite
def _stream(draw: st.DrawFn) -> list[Any]:
    n = draw(st.integers(1, 40))
    return [draw(_record_strategy(i)) for i in range(n)]


def _check_batch(b: Batch, records: list[Any]) -> None:
    dead = [dl.record.offset for dl in b.dead]
    assert len(dead) == len(set(dead)), "a record dead-lettered twice"
    assert set(dead) <= {r.offset for r in records}
    for dl in b.dead:
        assert isinstance(dl, DeadLetter) and dl.reason and isinstance(dl.detail, str)
    assert len(b.values) == len(b.ticks)
    for t, v in zip(b.ticks, b.values, strict=True):
        assert v == orjson.dumps(t)
        parse_tick(v)  # the schema holds, too


def _canonical(ticks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in t.items() if k != "recv_ts"} for t in ticks]


@pytest.mark.slow
@PROPS
@given(records=_stream())
def test_every_record_is_applied_or_dead_lettered_once(records: list[Any]) -> None:
    w = _worker()
    b = w.transform(records)
    assert b is not None and b.records == records
    _check_batch(b, records)
    # Per-symbol sequences stay gap-free whatever failed in between.
    seen: dict[str, int] = {}
    for t in b.ticks:
        assert t["seq"] == seen.get(t["symbol"], 0) + 1
        seen[t["symbol"]] = t["seq"]
    # The state still snapshots (it holds nothing a record smuggled in).
    Normalizer.restore(w.norm.snapshot())


@pytest.mark.slow
@PROPS
@given(records=_stream(), split=st.integers(0, 40))
def test_restore_replay_fails_the_same_records_the_same_way(records: list[Any], split: int) -> None:
    """A live run, and a run restored at ``split`` (snapshot, or silent replay of the
    records before it), emit the same ticks and dead letters after ``split``."""
    split = min(split, len(records))
    live = _worker()
    head = live.transform(records[:split]) if split else None
    tail = live.transform(records[split:]) if split < len(records) else None

    replayed = _worker()
    for rec in records[:split]:
        replayed.apply(rec, 0, [], silent=True)
    replayed.committed = split
    tail2 = replayed.transform(records[split:]) if split < len(records) else None

    from_snap = _worker()
    if head is not None:
        live_at_split = _worker()
        live_at_split.transform(records[:split])
        from_snap.norm = Normalizer.restore(live_at_split.norm.snapshot())
    from_snap.committed = split
    tail3 = from_snap.transform(records[split:]) if split < len(records) else None

    for other in (tail2, tail3):
        if tail is None:
            assert other is None
            continue
        assert other is not None
        assert _canonical(other.ticks) == _canonical(tail.ticks)
        assert [(d.record.offset, d.reason, d.detail) for d in other.dead] == [
            (d.record.offset, d.reason, d.detail) for d in tail.dead
        ]
    assert replayed.norm.snapshot() == live.norm.snapshot()


@pytest.mark.parametrize(
    ("headers", "value", "reason"),
    [
        ([(HDR_CODEC, b"itch"), (HDR_DATE, b"not-a-date")], None, "bad_date"),
        ([(HDR_DATE, b"\xff")], None, "bad_date"),
        ([(HDR_DATE, b"9999-12-31")], None, "bad_date"),
        ([], None, "missing_date"),
        ([(HDR_CODEC, b"avro"), (HDR_DATE, DAY)], None, "unknown_codec"),
        (
            [(HDR_CODEC, b"json")],
            b'{"type":"trade","symbol":"A","venue":"X","ts":18446744073709551616,'
            b'"price":"1","size":"1","trade_id":"1"}',
            "invalid_json",
        ),
    ],
)
def test_known_poison_is_dead_lettered_with_its_reason(
    headers: list[tuple[str, bytes]], value: bytes | None, reason: str
) -> None:
    add = itch.encode(itch.AddOrder(1, 0, 5, 7, "B", 100, "AAPL", 1_000_000))
    rec = _record(0, value if value is not None else add, headers)
    good = _record(1, add, [(HDR_DATE, DAY)])
    w = _worker()
    b = w.transform([rec, good])
    assert b is not None
    assert [(d.record.offset, d.reason) for d in b.dead] == [(0, reason)]
    assert len(b.ticks) == 1 and b.ticks[0]["kind"] == "quote"


def test_a_tick_that_cannot_be_serialised_fails_its_record_only() -> None:
    """Whatever slips past validation into a tick fails at serialisation, per record,
    and gives its sequence number back."""
    w = _worker()
    good = b'{"type":"trade","symbol":"A","venue":"X","ts":1,"price":"1","size":"1","trade_id":"1"}'
    recs = [_record(i, good, [(HDR_CODEC, b"json")]) for i in range(3)]
    orig = w.norm.on_json
    calls = []

    def on_json(payload: bytes, recv_ts: int, out: list[dict[str, Any]]) -> None:
        orig(payload, recv_ts, out)
        calls.append(payload)
        if len(calls) == 2:
            out[-1]["event_ts"] = 2**64  # beyond what the wire format carries

    w.norm.on_json = on_json  # type: ignore[method-assign]
    b = w.transform(recs)
    assert b is not None
    assert [(d.record.offset, d.reason) for d in b.dead] == [(1, "unserialisable")]
    assert [t["seq"] for t in b.ticks] == [1, 2]


@st.composite
def _framed_file(draw: st.DrawFn) -> tuple[bytes, int]:
    """A framed ITCH stream of sensible messages with runs of garbage between or inside
    frames: (its bytes, the number of garbage runs)."""
    frames = [itch.frame(draw(_sensible())) for _ in range(draw(st.integers(3, 30)))]
    data = bytearray(b"".join(frames))
    runs = draw(st.integers(0, 3))
    for _ in range(runs):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data), runs


@pytest.mark.slow
@PROPS
@given(stream=_framed_file())
def test_itch_framing_through_the_per_record_path(stream: tuple[bytes, int]) -> None:
    """What the replay cuts from a damaged ITCH file, fed to a handler's per-record step:
    nothing raises, a desynchronised span is dead-lettered whole, a valid frame is not
    blamed for its neighbours' garbage."""
    import io

    data, runs = stream
    payloads = list(itch.iter_frames(io.BytesIO(data)))
    records = [
        _record(i, p, [(HDR_CODEC, b"itch"), (HDR_DATE, DAY)]) for i, p in enumerate(payloads)
    ]
    w = _worker()
    b = w.transform(records)
    assert b is not None
    _check_batch(b, records)
    dead = {dl.record.offset for dl in b.dead}
    for i, p in enumerate(payloads):
        if not itch.is_frame(p):
            assert i in dead, f"desync span {p!r:.60} was not dead-lettered"
    if runs == 0:
        assert all(itch.is_frame(p) for p in payloads)


def test_a_new_day_numbers_its_feed_from_one_and_yesterday_is_dead_lettered() -> None:
    """The feed's sequence starts again each trading day: the first records of a new day
    are no gap, a gap inside it still is, and a record of the day before that arrives
    after today's began is dead-lettered without touching today's numbers."""
    add = itch.encode(itch.AddOrder(1, 0, 5, 7, "B", 100, "AAPL", 1_000_000))

    def rec(offset: int, day: bytes, seq: int) -> Any:
        return _record(offset, add, [(HDR_DATE, day), (HDR_SEQ, str(seq).encode())])

    w = _worker()
    w.transform([rec(i, DAY, i + 1) for i in range(100)])
    assert w.norm.gaps == 0
    today = b"2024-11-26"
    b = w.transform(
        [rec(100, today, 1), rec(101, today, 2), rec(102, DAY, 101), rec(103, today, 4)]
    )
    assert b is not None
    assert [(d.record.offset, d.reason) for d in b.dead] == [(102, "previous_day")]
    assert w.norm.gaps == 1  # seq 3 of today, and nothing else
    assert w.norm.last_feed_seq == 4
