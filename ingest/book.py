"""Per-symbol limit order books rebuilt from ITCH order events.

Only what top-of-book needs is kept: live orders (side, price, shares) and the
aggregate shares per price level. The best level is cached and recomputed only
when the best level empties, which keeps adds and partial fills O(1).

All methods are deterministic functions of the message sequence, so a book
restored from a snapshot and replayed forward is identical to one that never
moved (the property the handler's exactly-once guarantee rests on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Top = tuple[int | None, int | None, int | None, int | None]  # bid px, bid sz, ask px, ask sz


class BookError(Exception):
    """An order event that does not fit the book (unknown order, over-fill)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class SideLevels:
    is_bid: bool
    levels: dict[int, int] = field(default_factory=dict)  # price_e4 -> total shares
    best: int | None = None

    def add(self, price: int, shares: int) -> None:
        self.levels[price] = self.levels.get(price, 0) + shares
        if self.best is None or (price > self.best if self.is_bid else price < self.best):
            self.best = price

    def remove(self, price: int, shares: int) -> None:
        left = self.levels[price] - shares
        if left > 0:
            self.levels[price] = left
            return
        del self.levels[price]
        if price == self.best:
            if not self.levels:
                self.best = None
            else:
                self.best = max(self.levels) if self.is_bid else min(self.levels)

    def top(self) -> tuple[int | None, int | None]:
        if self.best is None:
            return None, None
        return self.best, self.levels[self.best]


@dataclass
class SymbolBook:
    bids: SideLevels = field(default_factory=lambda: SideLevels(True))
    asks: SideLevels = field(default_factory=lambda: SideLevels(False))

    def top(self) -> Top:
        bp, bs = self.bids.top()
        ap, asz = self.asks.top()
        return bp, bs, ap, asz


class Books:
    """All books of one input partition, keyed by stock locate.

    ITCH order reference numbers are unique across the whole day, so one order
    map serves every symbol in the partition.
    """

    def __init__(self) -> None:
        self.books: dict[int, SymbolBook] = {}
        # order_ref -> [locate, is_bid, price_e4, shares]
        self.orders: dict[int, list[Any]] = {}

    def book(self, locate: int) -> SymbolBook:
        b = self.books.get(locate)
        if b is None:
            b = self.books[locate] = SymbolBook()
        return b

    def add(self, locate: int, order_ref: int, side: str, shares: int, price: int) -> SymbolBook:
        if order_ref in self.orders:
            raise BookError("duplicate_order", str(order_ref))
        is_bid = side == "B"
        self.orders[order_ref] = [locate, is_bid, price, shares]
        b = self.book(locate)
        (b.bids if is_bid else b.asks).add(price, shares)
        return b

    def _order(self, locate: int, order_ref: int) -> list[Any]:
        o = self.orders.get(order_ref)
        if o is None:
            raise BookError("unknown_order", str(order_ref))
        if o[0] != locate:
            raise BookError("locate_mismatch", f"order {order_ref} is locate {o[0]}, not {locate}")
        return o

    def reduce(self, locate: int, order_ref: int, shares: int) -> tuple[SymbolBook, int, bool]:
        """Remove ``shares`` from an order (execution or partial cancel).

        Returns the book, the order's price and whether the order was resting on
        the bid. Over-reduction is an inconsistency; the order is removed so the
        book stays usable and the error is reported to the caller.
        """
        o = self._order(locate, order_ref)
        _, is_bid, price, left = o
        b = self.books[locate]
        take = min(shares, left)
        (b.bids if is_bid else b.asks).remove(price, take)
        if take == left:
            del self.orders[order_ref]
        else:
            o[3] = left - take
        if shares > left:
            raise BookError("overfill", f"order {order_ref} had {left}, reduce {shares}")
        return b, price, is_bid

    def delete(self, locate: int, order_ref: int) -> SymbolBook:
        o = self._order(locate, order_ref)
        b = self.books[locate]
        (b.bids if o[1] else b.asks).remove(o[2], o[3])
        del self.orders[order_ref]
        return b

    def replace(
        self, locate: int, original_ref: int, new_ref: int, shares: int, price: int
    ) -> SymbolBook:
        o = self._order(locate, original_ref)
        is_bid = o[1]
        self.delete(locate, original_ref)
        return self.add(locate, new_ref, "B" if is_bid else "S", shares, price)

    # Snapshots: plain lists so they serialise compactly with orjson.

    def snapshot(self) -> dict[str, Any]:
        return {"orders": [[ref, *o] for ref, o in self.orders.items()]}

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> Books:
        books = cls()
        for ref, locate, is_bid, price, shares in snap["orders"]:
            books.orders[ref] = [locate, is_bid, price, shares]
            b = books.book(locate)
            (b.bids if is_bid else b.asks).add(price, shares)
        return books
