"""JSON trade/quote feed codec: valid messages decode, every invalid one names its field."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest

from ingest.codecs.errors import DecodeError
from ingest.codecs.jsonfeed import JsonQuote, JsonTrade, decode_json, instrument_key

TRADE: dict[str, Any] = {
    "type": "trade",
    "symbol": "BTC-USD",
    "venue": "XCOI",
    "ts": 1732541400123456789,
    "price": "97012.35",
    "size": "0.015",
    "side": "B",
    "trade_id": "8812734",
}
QUOTE: dict[str, Any] = {
    "type": "quote",
    "symbol": "BTC-USD",
    "venue": "XCOI",
    "ts": "2024-11-25T14:30:00.5Z",
    "bid_px": "97012.30",
    "bid_sz": "1.2",
    "ask_px": "97012.40",
    "ask_sz": "0.8",
}

# 2024-11-25T14:30:00Z
T0 = 1732545000 * 1_000_000_000


def enc(d: dict[str, Any]) -> bytes:
    return orjson.dumps(d)


def with_(base: dict[str, Any], **kw: Any) -> dict[str, Any]:
    d = dict(base)
    d.update(kw)
    return d


def without(base: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in base.items() if k != key}


def test_trade_int_ts() -> None:
    m = decode_json(enc(TRADE))
    assert isinstance(m, JsonTrade)
    assert m.symbol == "BTC-USD"
    assert m.venue == "XCOI"
    assert m.ts == 1732541400123456789
    assert m.price == Decimal("97012.35")
    assert str(m.price) == "97012.35"
    assert m.size == Decimal("0.015")
    assert m.side == "B"
    assert m.trade_id == "8812734"
    assert instrument_key(m) == b"BTC-USD"


def test_trade_str_payload_and_no_side() -> None:
    m = decode_json(enc(without(TRADE, "side")).decode())
    assert isinstance(m, JsonTrade)
    assert m.side == ""


def test_quote_iso_ts() -> None:
    m = decode_json(enc(QUOTE))
    assert isinstance(m, JsonQuote)
    assert m.ts == T0 + 500_000_000
    assert (m.bid_px, m.bid_sz, m.ask_px, m.ask_sz) == (
        Decimal("97012.30"),
        Decimal("1.2"),
        Decimal("97012.40"),
        Decimal("0.8"),
    )


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2024-11-25T14:30:00Z", T0),
        ("2024-11-25T14:30:00+00:00", T0),
        ("2024-11-25T09:30:00-05:00", T0),
        ("2024-11-25T15:30:00.25+01:00", T0 + 250_000_000),
        ("2024-11-25T14:30:00.000001Z", T0 + 1_000),
        # nanosecond precision must not be lost (datetime only keeps microseconds)
        ("2024-11-25T14:30:00.123456789Z", T0 + 123_456_789),
        ("2024-11-25T14:30:00.000000001+00:00", T0 + 1),
        ("1732545000000000000", T0),  # digit string = ns
        (T0 + 7, T0 + 7),
    ],
)
def test_ts_forms(ts: Any, expected: int) -> None:
    assert decode_json(enc(with_(QUOTE, ts=ts))).ts == expected
    assert decode_json(enc(with_(TRADE, ts=ts))).ts == expected


def test_quote_null_sides() -> None:
    m = decode_json(enc(with_(QUOTE, bid_px=None, bid_sz=None)))
    assert isinstance(m, JsonQuote)
    assert m.bid_px is None and m.bid_sz is None
    assert m.ask_px == Decimal("97012.40")
    m2 = decode_json(enc(without(without(QUOTE, "ask_px"), "ask_sz")))
    assert isinstance(m2, JsonQuote)
    assert m2.ask_px is None and m2.ask_sz is None


def _reject(payload: bytes | str, field: str) -> DecodeError:
    with pytest.raises(DecodeError) as ei:
        decode_json(payload)
    e = ei.value
    assert e.reason == "invalid_json"
    assert field in e.detail, e.detail
    assert field in str(e)
    return e


@pytest.mark.parametrize("field", ["symbol", "venue", "ts", "price", "size", "trade_id"])
def test_trade_missing_field(field: str) -> None:
    e = _reject(enc(without(TRADE, field)), field)
    assert "required" in e.detail.lower()


@pytest.mark.parametrize("field", ["symbol", "venue", "ts"])
def test_quote_missing_field(field: str) -> None:
    _reject(enc(without(QUOTE, field)), field)


@pytest.mark.parametrize("field", ["price", "size"])
@pytest.mark.parametrize("value", ["-1", "-0.01", "0", -5, 0])
def test_trade_non_positive(field: str, value: Any) -> None:
    _reject(enc(with_(TRADE, **{field: value})), field)


@pytest.mark.parametrize("field", ["bid_px", "bid_sz", "ask_px", "ask_sz"])
def test_quote_negative(field: str) -> None:
    _reject(enc(with_(QUOTE, **{field: "-97012.30"})), field)


@pytest.mark.parametrize("value", ['"NaN"', "NaN", '"Infinity"', "Infinity", '"-inf"', "1e400"])
@pytest.mark.parametrize("field", ["price", "size"])
def test_trade_non_finite(field: str, value: str) -> None:
    body = enc(without(TRADE, field)).decode()
    payload = body[:-1] + f', "{field}": {value}}}'
    _reject(payload, field)


@pytest.mark.parametrize("field", ["bid_px", "ask_sz"])
def test_quote_nan(field: str) -> None:
    _reject(enc(with_(QUOTE, **{field: "NaN"})), field)


@pytest.mark.parametrize("side", ["X", "b", "BUY", "BS", 1, None])
def test_bad_side(side: Any) -> None:
    _reject(enc(with_(TRADE, side=side)), "side")


@pytest.mark.parametrize("base", [TRADE, QUOTE], ids=["trade", "quote"])
def test_extra_field(base: dict[str, Any]) -> None:
    _reject(enc(with_(base, exchange_ts=1)), "exchange_ts")


@pytest.mark.parametrize(
    "ts",
    [
        "2024-11-25T14:30:00",
        "2024-11-25T14:30:00.5",
        "2024-11-25 14:30:00",
        "2024-11-25",
    ],
)
def test_iso_without_zone(ts: str) -> None:
    e = _reject(enc(with_(QUOTE, ts=ts)), "ts")
    assert "zone" in e.detail


@pytest.mark.parametrize("ts", [True, -1, 1.5, "", "yesterday", "2024-13-01T00:00:00Z", [1]])
def test_bad_ts(ts: Any) -> None:
    _reject(enc(with_(TRADE, ts=ts)), "ts")


@pytest.mark.parametrize("field", ["symbol", "venue", "trade_id"])
def test_empty_strings(field: str) -> None:
    _reject(enc(with_(TRADE, **{field: ""})), field)


def test_too_long_symbol() -> None:
    _reject(enc(with_(TRADE, symbol="X" * 65)), "symbol")
    assert decode_json(enc(with_(TRADE, symbol="X" * 64))).symbol == "X" * 64


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"[1, 2]", b"42", b'{"type": "fill"}', b"{}", b'{"symbol": "X"}'],
)
def test_not_a_message(payload: bytes) -> None:
    with pytest.raises(DecodeError) as ei:
        decode_json(payload)
    assert ei.value.reason == "invalid_json"
    assert ei.value.detail


def test_trade_frozen() -> None:
    m = decode_json(enc(TRADE))
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError
        m.price = Decimal(1)  # type: ignore[misc]
