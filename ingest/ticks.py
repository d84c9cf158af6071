"""The normalised tick: the one output format of every feed handler.

Wire format on ``md.ticks``: one JSON object per Kafka record, key = symbol,
schema below (``v`` = schema version). Prices and sizes are decimal strings so
no venue's precision is lost. Timestamps are integer nanoseconds since the Unix
epoch (UTC).

The handler builds ticks as plain dicts and serialises them with orjson on the
hot path; ``Trade``/``Quote`` are the schema, used to validate and document it
and by any consumer that wants typed objects (``parse_tick``).
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1


class _TickBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    symbol: str = Field(min_length=1)
    venue: str = Field(min_length=1, description="MIC of the source venue, e.g. XNAS")
    seq: int = Field(ge=1, description="per-symbol sequence, 1-based, gap-free")
    event_ts: int = Field(description="exchange event time, ns since epoch UTC")
    recv_ts: int = Field(description="time the handler received the raw message, ns UTC")


class Trade(_TickBase):
    kind: Literal["trade"] = "trade"
    price: Decimal
    size: Decimal
    side: Literal["B", "S", ""] = Field(description="aggressor side when known")
    trade_id: str
    cross: str = Field("", description="ITCH cross type for crosses: O, C, H, I")


class Quote(_TickBase):
    kind: Literal["quote"] = "quote"
    bid_px: Decimal | None
    bid_sz: Decimal | None
    ask_px: Decimal | None
    ask_sz: Decimal | None


Tick = Annotated[Trade | Quote, Field(discriminator="kind")]
_tick_adapter: TypeAdapter[Trade | Quote] = TypeAdapter(Tick)


def parse_tick(data: bytes | str) -> Trade | Quote:
    """Validate one ``md.ticks`` record value into a typed tick."""
    return _tick_adapter.validate_json(data)


def tick_json_schema() -> dict[str, Any]:
    return _tick_adapter.json_schema()


def price_e4(p: int) -> str:
    """Format a 4-implied-decimal integer price as an exact decimal string."""
    return f"{p // 10000}.{p % 10000:04d}"


def dumps(tick: dict[str, Any]) -> bytes:
    return orjson.dumps(tick)


# Fields that do not depend on when or where a tick was produced; the checksum
# covers exactly these, so a replayed or moved partition must reproduce them.
_CANONICAL_EXCLUDE = frozenset({"recv_ts"})


def canonical(tick: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {k: v for k, v in tick.items() if k not in _CANONICAL_EXCLUDE},
        option=orjson.OPT_SORT_KEYS,
    )


class SymbolLedger:
    """Running count and order-sensitive checksum of one symbol's ticks."""

    __slots__ = ("_h", "count")

    def __init__(self) -> None:
        self.count = 0
        self._h = hashlib.blake2b(digest_size=16)

    def add(self, tick: dict[str, Any]) -> None:
        self.count += 1
        self._h.update(canonical(tick))
        self._h.update(b"\n")

    @property
    def checksum(self) -> str:
        return self._h.hexdigest()
