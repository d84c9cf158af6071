"""Order books: top of book through adds, executions, cancels, deletes, replaces."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.book import BookError, Books

L = 7  # locate


def built() -> Books:
    b = Books()
    b.add(L, 1, "B", 100, 100_0000)  # bid 100.00 x 100
    b.add(L, 2, "B", 200, 99_9900)  # bid  99.99 x 200
    b.add(L, 3, "S", 300, 100_0500)  # ask 100.05 x 300
    b.add(L, 4, "S", 50, 100_0100)  # ask 100.01 x 50
    b.add(L, 5, "B", 25, 100_0000)  # bid 100.00 +25
    return b


def check_consistent(b: Books) -> None:
    """Levels and best prices are exactly what the live orders imply."""
    expect: dict[int, dict[bool, dict[int, int]]] = {}
    for locate, is_bid, price, shares in b.orders.values():
        lv = expect.setdefault(locate, {True: {}, False: {}})[is_bid]
        lv[price] = lv.get(price, 0) + shares
    for locate, book in b.books.items():
        e = expect.get(locate, {True: {}, False: {}})
        assert book.bids.levels == e[True]
        assert book.asks.levels == e[False]
        assert book.bids.best == (max(e[True]) if e[True] else None)
        assert book.asks.best == (min(e[False]) if e[False] else None)
    assert set(expect) <= set(b.books)


def test_adds_set_best() -> None:
    b = Books()
    assert b.book(L).top() == (None, None, None, None)
    b.add(L, 1, "B", 100, 100_0000)
    assert b.book(L).top() == (100_0000, 100, None, None)
    b.add(L, 2, "S", 300, 100_0500)
    assert b.book(L).top() == (100_0000, 100, 100_0500, 300)
    b.add(L, 3, "B", 10, 99_0000)  # worse bid: top unchanged
    assert b.book(L).top() == (100_0000, 100, 100_0500, 300)
    b.add(L, 4, "S", 20, 100_0100)  # better ask
    assert b.book(L).top() == (100_0000, 100, 100_0100, 20)
    b.add(L, 5, "B", 40, 100_0000)  # joins best bid
    assert b.book(L).top() == (100_0000, 140, 100_0100, 20)
    b.add(L, 6, "B", 1, 100_0050)  # improves bid
    assert b.book(L).top() == (100_0050, 1, 100_0100, 20)
    check_consistent(b)


def test_books_are_per_locate() -> None:
    b = built()
    b.add(8, 100, "S", 5, 1_0000)
    assert b.book(8).top() == (None, None, 1_0000, 5)
    assert b.book(L).top() == (100_0000, 125, 100_0100, 50)
    check_consistent(b)


def test_partial_execution() -> None:
    b = built()
    book, price, is_bid = b.reduce(L, 1, 30)
    assert (price, is_bid) == (100_0000, True)
    assert book is b.book(L)
    assert book.top() == (100_0000, 95, 100_0100, 50)
    assert b.orders[1] == [L, True, 100_0000, 70]
    check_consistent(b)


def test_full_execution_of_best_recomputes() -> None:
    b = built()
    book, price, is_bid = b.reduce(L, 4, 50)
    assert (price, is_bid) == (100_0100, False)
    assert 4 not in b.orders
    assert book.top() == (100_0000, 125, 100_0500, 300)
    check_consistent(b)


def test_cancel_partial() -> None:
    b = built()
    b.reduce(L, 3, 100)
    assert b.book(L).top() == (100_0000, 125, 100_0100, 50)
    assert b.orders[3][3] == 200
    b.reduce(L, 4, 49)
    assert b.book(L).top() == (100_0000, 125, 100_0100, 1)
    check_consistent(b)


def test_delete_updates_and_recomputes() -> None:
    b = built()
    b.delete(L, 1)
    assert b.book(L).top() == (100_0000, 25, 100_0100, 50)
    b.delete(L, 5)  # best bid level empties -> next level
    assert b.book(L).top() == (99_9900, 200, 100_0100, 50)
    b.delete(L, 2)
    assert b.book(L).top() == (None, None, 100_0100, 50)
    b.delete(L, 4)
    b.delete(L, 3)
    assert b.book(L).top() == (None, None, None, None)
    assert b.orders == {}
    check_consistent(b)


def test_delete_non_best_level_keeps_best() -> None:
    b = built()
    b.delete(L, 2)
    assert b.book(L).top() == (100_0000, 125, 100_0100, 50)
    assert 99_9900 not in b.book(L).bids.levels
    check_consistent(b)


def test_replace() -> None:
    b = built()
    book = b.replace(L, 4, 40, 70, 100_0200)  # best ask moves back
    assert 4 not in b.orders
    assert b.orders[40] == [L, False, 100_0200, 70]  # keeps the side
    assert book.top() == (100_0000, 125, 100_0200, 70)
    b.replace(L, 2, 20, 10, 100_0100)  # bid improves, keeps side
    assert b.orders[20] == [L, True, 100_0100, 10]
    assert book.top() == (100_0100, 10, 100_0200, 70)
    check_consistent(b)


@pytest.mark.parametrize("op", ["reduce", "delete", "replace"])
def test_unknown_order(op: str) -> None:
    b = built()
    before = orjson.dumps(b.snapshot())
    top = b.book(L).top()
    with pytest.raises(BookError) as ei:
        if op == "reduce":
            b.reduce(L, 999, 1)
        elif op == "delete":
            b.delete(L, 999)
        else:
            b.replace(L, 999, 1000, 1, 1)
    assert ei.value.reason == "unknown_order"
    assert orjson.dumps(b.snapshot()) == before
    assert b.book(L).top() == top


def test_unknown_order_after_delete() -> None:
    b = built()
    b.delete(L, 3)
    with pytest.raises(BookError) as ei:
        b.reduce(L, 3, 1)
    assert ei.value.reason == "unknown_order"


def test_locate_mismatch_and_duplicate() -> None:
    b = built()
    with pytest.raises(BookError) as ei:
        b.delete(L + 1, 1)
    assert ei.value.reason == "locate_mismatch"
    with pytest.raises(BookError) as ei:
        b.add(L, 1, "S", 1, 1)
    assert ei.value.reason == "duplicate_order"
    assert b.book(L).top() == (100_0000, 125, 100_0100, 50)
    check_consistent(b)


def test_overfill() -> None:
    b = built()
    with pytest.raises(BookError) as ei:
        b.reduce(L, 4, 51)
    assert ei.value.reason == "overfill"
    # the order is gone, the level emptied, and the book is still usable
    assert 4 not in b.orders
    assert b.book(L).top() == (100_0000, 125, 100_0500, 300)
    check_consistent(b)
    b.add(L, 9, "S", 5, 100_0100)
    assert b.book(L).top() == (100_0000, 125, 100_0100, 5)
    check_consistent(b)


def test_overfill_shared_level() -> None:
    b = built()
    with pytest.raises(BookError):
        b.reduce(L, 5, 1000)  # 25 of the 125 at 100.00
    assert b.book(L).top() == (100_0000, 100, 100_0100, 50)
    check_consistent(b)


def test_snapshot_restore_identical() -> None:
    b = built()
    b.add(8, 77, "S", 5, 1_0000)
    b.reduce(L, 3, 100)
    b.replace(L, 2, 22, 10, 99_9800)
    snap = orjson.loads(orjson.dumps(b.snapshot()))  # through the wire format
    r = Books.restore(snap)
    assert r.orders == b.orders
    assert list(r.orders) == list(b.orders)
    for loc in (L, 8):
        assert r.book(loc).top() == b.book(loc).top()
    check_consistent(r)
    # and both evolve identically afterwards
    for x in (b, r):
        x.delete(L, 1)
        x.delete(L, 5)
    assert r.book(L).top() == b.book(L).top() == (99_9800, 10, 100_0100, 50)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 300))
def test_random_ops_stay_consistent_and_restore(seed: int, n: int) -> None:
    """Random valid and invalid operations: the book always matches its orders,
    and a restored snapshot tracks the original exactly."""
    rng = random.Random(seed)
    b = Books()
    shadow: Books | None = None
    next_ref = 1
    for i in range(n):
        if i == n // 2:
            shadow = Books.restore(orjson.loads(orjson.dumps(b.snapshot())))
        loc = rng.choice((1, 2))
        refs = [r for r, o in b.orders.items() if o[0] == loc]
        op = rng.random()
        args: tuple[Any, ...]
        if not refs or op < 0.4:
            name, args = (
                "add",
                (
                    loc,
                    next_ref,
                    rng.choice("BS"),
                    rng.randrange(1, 500),
                    rng.randrange(90, 110) * 100,
                ),
            )
            next_ref += 1
        elif op < 0.6:
            ref = rng.choice(refs)
            name, args = "reduce", (loc, ref, rng.randrange(1, b.orders[ref][3] + 50))
        elif op < 0.75:
            name, args = "delete", (loc, rng.choice(refs))
        elif op < 0.9:
            name, args = (
                "replace",
                (
                    loc,
                    rng.choice(refs),
                    next_ref,
                    rng.randrange(1, 500),
                    rng.randrange(90, 110) * 100,
                ),
            )
            next_ref += 1
        else:
            name, args = "delete", (loc, 10**9 + i)  # unknown
        for x in (b, shadow) if shadow is not None else (b,):
            try:
                getattr(x, name)(*args)
            except BookError:
                pass
        check_consistent(b)
        if shadow is not None:
            assert shadow.orders == b.orders
            for loc2 in (1, 2):
                assert shadow.book(loc2).top() == b.book(loc2).top()
