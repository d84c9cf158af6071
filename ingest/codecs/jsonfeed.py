"""A simple JSON trade/quote feed format, for venues without a binary codec.

One JSON object per message (one per line in a ``.jsonl`` file)::

    {"type": "trade", "symbol": "BTC-USD", "venue": "XCOI", "ts": 1732541400123456789,
     "price": "97012.35", "size": "0.015", "side": "B", "trade_id": "8812734"}
    {"type": "quote", "symbol": "BTC-USD", "venue": "XCOI", "ts": "2024-11-25T14:30:00.5Z",
     "bid_px": "97012.30", "bid_sz": "1.2", "ask_px": "97012.40", "ask_sz": "0.8"}

``ts`` is integer nanoseconds since the Unix epoch or an ISO 8601 time with a
zone. Prices and sizes are decimal strings (numbers are accepted too). ``side``
is the aggressor (``B``, ``S`` or empty). A quote side may be null when empty.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from ingest.codecs.errors import DecodeError

# Fractional seconds of an ISO time (dates and zones contain no "." or ",").
_FRACTION = re.compile(r"[.,](\d+)")

PositiveDecimal = Annotated[Decimal, Field(gt=0, allow_inf_nan=False)]


class _JsonBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    symbol: str = Field(min_length=1, max_length=64)
    venue: str = Field(min_length=1, max_length=16)
    # Bounded by the tick schema's signed 64-bit integers, which every reader can hold.
    ts: int = Field(ge=0, le=2**63 - 1, description="event time, ns since epoch UTC")

    @field_validator("ts", mode="before")
    @classmethod
    def _parse_ts(cls, v: object) -> object:
        if isinstance(v, str) and not v.isdigit():
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
            if dt.tzinfo is None:
                raise ValueError("ISO timestamp needs a time zone")
            # Split to keep nanosecond arithmetic exact (float seconds lose precision).
            # datetime keeps only microseconds, so take the fraction from the text.
            whole = int(dt.replace(microsecond=0).timestamp())
            frac = _FRACTION.search(v)
            frac_ns = int(frac.group(1)[:9].ljust(9, "0")) if frac else 0
            return whole * 1_000_000_000 + frac_ns
        if isinstance(v, bool):
            raise ValueError("ts must be a number or an ISO 8601 string")
        return v


class JsonTrade(_JsonBase):
    type: Literal["trade"]
    price: PositiveDecimal
    size: PositiveDecimal
    side: Literal["B", "S", ""] = ""
    trade_id: str = Field(min_length=1, max_length=64)


class JsonQuote(_JsonBase):
    type: Literal["quote"]
    bid_px: PositiveDecimal | None = None
    bid_sz: PositiveDecimal | None = None
    ask_px: PositiveDecimal | None = None
    ask_sz: PositiveDecimal | None = None


JsonMessage = Annotated[JsonTrade | JsonQuote, Field(discriminator="type")]
_adapter: TypeAdapter[JsonTrade | JsonQuote] = TypeAdapter(JsonMessage)


def decode_json(payload: bytes | str) -> JsonTrade | JsonQuote:
    """Validate one JSON feed message; raises DecodeError naming the bad field."""
    try:
        return _adapter.validate_json(payload)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "message"
        raise DecodeError("invalid_json", f"{where}: {first.get('msg')}") from None


def instrument_key(m: JsonTrade | JsonQuote) -> bytes:
    return m.symbol.encode()
