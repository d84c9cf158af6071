"""Raw venue message -> normalised ticks, for one input partition.

A ``Normalizer`` holds everything a partition's output depends on: the stock
directory, the order books, the last top of book per symbol, the per-symbol
tick sequence and the feed sequence seen so far. Processing is a pure function
of that state and the message, so the state can be snapshotted, restored and
replayed forward to reproduce exactly the ticks an unmoved handler would emit.

The replay feed runs the same code over what it sends to compute the
manifest's expected ticks, so the expectation and the handler cannot drift.
"""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime, time
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from ingest.book import BookError, Books, SymbolBook, Top
from ingest.codecs import itch
from ingest.codecs.errors import DecodeError
from ingest.codecs.jsonfeed import JsonQuote, JsonTrade, decode_json
from ingest.ticks import price_e4

EXCHANGE_TZ = ZoneInfo("America/New_York")
ITCH_VENUE = "XNAS"


# Event times are published as signed 64-bit nanoseconds (the tick schema's
# integers must fit every reader), which reach to 2262-04-11.
_FIRST_DAY = date(1970, 1, 2)
_LAST_DAY = date(2262, 4, 10)


@lru_cache(maxsize=64)
def midnight_ns(day: str) -> int:
    """UTC epoch ns of local midnight in the exchange's time zone on ``day``."""
    d = date.fromisoformat(day)
    return int(datetime.combine(d, time(0), tzinfo=EXCHANGE_TZ).timestamp()) * 1_000_000_000


@lru_cache(maxsize=64)  # per record on the hot path; failures are not cached
def day_start_ns(day: bytes | str) -> int:
    """``midnight_ns`` of a record's date header; DecodeError for anything but an
    ISO date whose times fit the tick schema."""
    try:
        text = day.decode("ascii") if isinstance(day, bytes) else day
        if not _FIRST_DAY <= date.fromisoformat(text) <= _LAST_DAY:
            raise ValueError("outside 1970-01-02..2262-04-10")
        return midnight_ns(text)
    except ValueError as e:  # UnicodeDecodeError is one
        raise DecodeError("bad_date", f"date header {day!r:.40}: {e}") from None


@lru_cache(maxsize=64)
def _trading_day(day: bytes | str) -> date | None:
    """A date header as a date; None where it is not one (its record is dead-lettered
    when decoded, by ``day_start_ns``)."""
    try:
        day_start_ns(day)
        return date.fromisoformat(day.decode("ascii") if isinstance(day, bytes) else day)
    except DecodeError:
        return None


class Normalizer:
    """Stateful transform of one partition's raw messages into tick dicts.

    ITCH state belongs to one trading day: order references, stock locates and the feed's
    sequence numbers start again each day, so a record of a later day starts the state
    afresh, and the ticks of every symbol are numbered from 1 again. Handlers run on from
    one day to the next through the same topics; books carried over would price today's
    quotes with yesterday's resting orders.
    """

    def __init__(self) -> None:
        self._start_day_state()
        self.book_errors: Counter[str] = Counter()
        self.gaps = 0
        # The trading day of the ITCH state (None before the first ITCH record), and the
        # header it was last seen as: most records carry the same one, so callers compare
        # a record's header with it before calling enter_day.
        self.day: date | None = None
        self.day_header: bytes | str | None = None

    def enter_day(self, day: bytes | str) -> bool:
        """Take a record's date header: a later day than the state's starts the day's
        state afresh. False for a record of an earlier day, which cannot be applied to
        today's books; True otherwise (a header that is no date included: decoding the
        record dead-letters it)."""
        if day == self.day_header or not isinstance(day, bytes | str):  # a null header
            return True
        d = _trading_day(day)
        if d is None:
            return True
        if self.day is not None and d < self.day:
            return False
        if self.day is not None and d > self.day:
            self._start_day_state()
        self.day = d
        self.day_header = day
        return True

    def _start_day_state(self) -> None:
        """Everything that belongs to one trading day, empty: the state of a new handler
        and of a new day alike, so a field added here cannot be carried into the next."""
        self.books = Books()
        self.directory: dict[int, str] = {}
        self.last_top: dict[int, Top] = {}
        self.seqs: dict[str, int] = {}
        self.last_feed_seq = 0

    # Feed sequence -------------------------------------------------------

    def check_feed_seq(self, seq: int) -> int:
        """Record a feed sequence number; returns how many messages were skipped."""
        missed = 0
        if self.last_feed_seq and seq > self.last_feed_seq + 1:
            missed = seq - self.last_feed_seq - 1
            self.gaps += missed
        if seq > self.last_feed_seq:
            self.last_feed_seq = seq
        return missed

    # Tick construction ---------------------------------------------------

    def _next_seq(self, symbol: str) -> int:
        s = self.seqs.get(symbol, 0) + 1
        self.seqs[symbol] = s
        return s

    def _trade(
        self, out: list[dict[str, Any]], symbol: str, venue: str, when: tuple[int, int],
        fill: tuple[str, str], side: str, trade_id: str, cross: str = "",
    ) -> None:  # fmt: skip
        """Append a trade tick; ``when`` is (event, receive) ns, ``fill`` (price, size)."""
        out.append(
            {
                "v": 1, "kind": "trade", "symbol": symbol, "venue": venue,
                "seq": self._next_seq(symbol), "event_ts": when[0], "recv_ts": when[1],
                "price": fill[0], "size": fill[1], "side": side, "trade_id": trade_id,
                "cross": cross,
            }
        )  # fmt: skip

    def _quote_if_changed(
        self, out: list[dict[str, Any]], locate: int, book: SymbolBook, when: tuple[int, int]
    ) -> None:
        top = book.top()
        if self.last_top.get(locate) == top:
            return
        self.last_top[locate] = top
        symbol = self.directory.get(locate)
        if symbol is None:
            self.book_errors["unknown_locate"] += 1
            return
        bp, bs, ap, asz = top
        out.append(
            {
                "v": 1, "kind": "quote", "symbol": symbol, "venue": ITCH_VENUE,
                "seq": self._next_seq(symbol), "event_ts": when[0], "recv_ts": when[1],
                "bid_px": None if bp is None else price_e4(bp),
                "bid_sz": None if bs is None else str(bs),
                "ask_px": None if ap is None else price_e4(ap),
                "ask_sz": None if asz is None else str(asz),
            }
        )  # fmt: skip

    # ITCH ----------------------------------------------------------------

    def on_itch(
        self, payload: bytes, day: bytes | str, recv_ts: int, out: list[dict[str, Any]]
    ) -> itch.ItchMessage:
        """Decode and apply one ITCH message, appending any ticks to ``out``.

        Raises itch.DecodeError for input that cannot be decoded, a ``day``
        that is not a date or one before the state's day (the caller
        dead-letters it), before any state changes. Book inconsistencies are
        counted, never raised.
        """
        msg = itch.decode(payload)
        when = (day_start_ns(day) + msg.timestamp, recv_ts)
        if day != self.day_header and not self.enter_day(day):  # (inline: per message)
            raise DecodeError(
                "previous_day", f"date header {day!r:.40} is before the state's day {self.day}"
            )
        try:
            if not self._apply_order(msg, when, out):
                self._apply_other(msg, when, out)
        except BookError as e:
            self.book_errors[e.reason] += 1
            # An over-fill still changed the book (the order is gone): publish
            # the new top now, stamped with the event that changed it.
            book = self.books.books.get(msg.locate)
            if book is not None:
                self._quote_if_changed(out, msg.locate, book, when)
        return msg

    def _apply_order(
        self, msg: itch.ItchMessage, when: tuple[int, int], out: list[dict[str, Any]]
    ) -> bool:
        """An order book message: apply it, append the trade it prints and the new top of
        book if it changed; False for any other message."""
        books = self.books
        loc = msg.locate
        if isinstance(msg, itch.AddOrder | itch.AddOrderMpid):
            self.directory.setdefault(loc, msg.stock)
            b = books.add(loc, msg.order_ref, msg.side, msg.shares, msg.price_e4)
        elif isinstance(msg, itch.OrderExecuted):
            b, price, was_bid = books.reduce(loc, msg.order_ref, msg.executed_shares)
            self._exec_trade(out, loc, when, price, was_bid, msg)
        elif isinstance(msg, itch.OrderExecutedWithPrice):
            b, _, was_bid = books.reduce(loc, msg.order_ref, msg.executed_shares)
            if msg.printable == "Y":
                self._exec_trade(out, loc, when, msg.price_e4, was_bid, msg)
        elif isinstance(msg, itch.OrderCancel):
            b, _, _ = books.reduce(loc, msg.order_ref, msg.cancelled_shares)
        elif isinstance(msg, itch.OrderDelete):
            b = books.delete(loc, msg.order_ref)
        elif isinstance(msg, itch.OrderReplace):
            b = books.replace(loc, msg.original_ref, msg.new_ref, msg.shares, msg.price_e4)
        else:
            return False
        self._quote_if_changed(out, loc, b, when)
        return True

    def _apply_other(
        self, msg: itch.ItchMessage, when: tuple[int, int], out: list[dict[str, Any]]
    ) -> None:
        """Off-book trades, crosses and the stock directory."""
        loc = msg.locate
        if isinstance(msg, itch.Trade):
            self.directory.setdefault(loc, msg.stock)
            # The side names the resting non-displayed order; the aggressor is opposite.
            side = "S" if msg.side == "B" else "B"
            fill = (price_e4(msg.price_e4), str(msg.shares))
            self._trade(out, msg.stock, ITCH_VENUE, when, fill, side, str(msg.match_number))
        elif isinstance(msg, itch.CrossTrade):
            self.directory.setdefault(loc, msg.stock)
            if msg.shares > 0:
                fill = (price_e4(msg.cross_price_e4), str(msg.shares))
                match = str(msg.match_number)
                self._trade(out, msg.stock, ITCH_VENUE, when, fill, "", match, msg.cross_type)
        elif isinstance(msg, itch.StockDirectory):
            self.directory[loc] = msg.stock

    def _exec_trade(
        self, out: list[dict[str, Any]], loc: int, when: tuple[int, int], price: int,
        was_bid: bool, msg: itch.OrderExecuted | itch.OrderExecutedWithPrice,
    ) -> None:  # fmt: skip
        symbol = self.directory.get(loc)
        if symbol is None:
            self.book_errors["unknown_locate"] += 1
            return
        fill = (price_e4(price), str(msg.executed_shares))
        side = "S" if was_bid else "B"
        self._trade(out, symbol, ITCH_VENUE, when, fill, side, str(msg.match_number))

    # JSON ----------------------------------------------------------------

    def on_json(self, payload: bytes, recv_ts: int, out: list[dict[str, Any]]) -> None:
        """Validate one JSON feed message and append its tick. Raises DecodeError."""
        m = decode_json(payload)
        when = (m.ts, recv_ts)
        if isinstance(m, JsonTrade):
            fill = (str(m.price), str(m.size))
            self._trade(out, m.symbol, m.venue, when, fill, m.side, m.trade_id)
        elif isinstance(m, JsonQuote):
            out.append(
                {
                    "v": 1, "kind": "quote", "symbol": m.symbol, "venue": m.venue,
                    "seq": self._next_seq(m.symbol), "event_ts": m.ts, "recv_ts": recv_ts,
                    "bid_px": None if m.bid_px is None else str(m.bid_px),
                    "bid_sz": None if m.bid_sz is None else str(m.bid_sz),
                    "ask_px": None if m.ask_px is None else str(m.ask_px),
                    "ask_sz": None if m.ask_sz is None else str(m.ask_sz),
                }
            )  # fmt: skip

    # Snapshots -----------------------------------------------------------

    def snapshot(self) -> bytes:
        return orjson.dumps(
            {
                "v": 1,
                "books": self.books.snapshot(),
                "directory": list(self.directory.items()),
                "last_top": [[k, list(v)] for k, v in self.last_top.items()],
                "seqs": self.seqs,
                "last_feed_seq": self.last_feed_seq,
                "day": None if self.day is None else self.day.isoformat(),
            }
        )

    @classmethod
    def restore(cls, blob: bytes) -> Normalizer:
        d = orjson.loads(blob)
        if d.get("v") != 1:
            raise ValueError(f"unsupported snapshot version {d.get('v')!r}")
        n = cls()
        n.books = Books.restore(d["books"])
        n.directory = {int(k): v for k, v in d["directory"]}
        n.last_top = {int(k): tuple(v) for k, v in d["last_top"]}
        n.seqs = dict(d["seqs"])
        n.last_feed_seq = int(d["last_feed_seq"])
        # Absent from snapshots taken before days were kept: the next record sets it.
        if d.get("day"):
            n.day = date.fromisoformat(d["day"])
        return n
