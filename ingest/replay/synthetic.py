"""A deterministic, realistic synthetic US-equity day as ITCH 5.0 messages.

Shape of the day (times America/New_York):

- 04:00 system event "start of messages" and "start of system hours", the stock
  directory, then a thin pre-market of adds, cancels and executions;
- 09:20-09:30 net order imbalance indicators ahead of the opening cross;
- 09:30 "start of market hours" and the opening cross (ITCH Q, type O) per symbol;
- a U-shaped message rate (``core.sessions.relative_rate``): the first minutes
  and the run into the close several times the midday rate;
- 15:50-16:00 imbalance indicators, 16:00 the closing cross (Q, type C) and "end
  of market hours"; a decaying after-hours tail to 20:00 "end of system hours".

Message arrivals are a Poisson process whose intensity follows the rate curve;
symbols have Zipf-like activity weights; each symbol keeps a real book of
resting orders so executions, cancels and replaces always refer to live orders.
Everything derives from one ``random.Random(seed)``, so a seed is a day.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass, field

from core import sessions
from ingest.codecs import itch
from ingest.keys import symbol_key
from ingest.replay.source import RawMessage

NS = 1_000_000_000
TICK = 100  # $0.01 in 4-implied-decimal units


@dataclass
class _Sym:
    locate: int
    stock: str
    mid: int
    key: bytes
    orders: dict[int, list[int]] = field(default_factory=dict)  # ref -> [is_bid, price, shares]


def symbol_names(n: int, seed: int) -> list[str]:
    """``n`` distinct ticker-like names, stable for a seed."""
    rng = random.Random(f"names:{seed}")
    names: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        length = rng.choice((2, 3, 3, 4, 4, 4))
        s = "".join(rng.choice(string.ascii_uppercase) for _ in range(length))
        if s not in names:
            names.add(s)
            out.append(s)
    return out


class SyntheticDay:
    """Iterates one synthetic trading day as ``RawMessage`` in time order.

    :param symbols: number of instruments
    :param seed: the day's identity; same seed, same bytes
    :param rate: midday messages per second per symbol (before activity weights)
    :param close: seconds since midnight of the close (13:00 on early-close days)
    """

    def __init__(
        self, symbols: int = 50, seed: int = 1, rate: float = 1.0, close: int = sessions.CLOSE
    ) -> None:
        if symbols < 1:
            raise ValueError("symbols must be >= 1")
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.n = symbols
        self.seed = seed
        self.rate = rate
        self.close = close
        self._tracking = 0
        self._ref = 0
        self._match = 0

    # --- helpers ------------------------------------------------------------

    def _next_tracking(self) -> int:
        self._tracking = (self._tracking + 1) & 0xFFFF
        return self._tracking

    def _msg(self, ts: int, m: itch.ItchMessage, key: bytes | None) -> RawMessage:
        return RawMessage(ts_ns=ts, key=key, payload=itch.encode(m), codec="itch")

    def _system(self, ts: int, code: str) -> RawMessage:
        return self._msg(ts, itch.SystemEvent(0, self._next_tracking(), ts, code), None)

    def __iter__(self) -> Iterator[RawMessage]:
        # Counters restart with every pass: the same object replays the same bytes.
        self._tracking = self._ref = self._match = 0
        rng = random.Random(self.seed)
        syms, cum = self._instruments(rng)
        t = sessions.PRE_MARKET_START * NS
        yield self._system(t, "O")
        yield self._system(t, "S")
        for s in syms:
            yield self._msg(t, self._directory(s), s.key)
            action = itch.StockTradingAction(
                s.locate, self._next_tracking(), t, s.stock, "T", " ", ""
            )
            yield self._msg(t, action, s.key)
        open_done = close_done = False
        second = sessions.PRE_MARKET_START
        while second < sessions.AFTER_HOURS_END:
            if not open_done and second >= sessions.OPEN:
                open_done = True
                ts = sessions.OPEN * NS
                yield self._system(ts, "Q")
                yield from self._crosses(rng, syms, ts, "O")
            if not close_done and second >= self.close:
                close_done = True
                ts = self.close * NS
                yield from self._crosses(rng, syms, ts, "C")
                yield self._system(ts, "M")
            yield from self._second(rng, syms, cum, second)
            second += 1
        ts = sessions.AFTER_HOURS_END * NS
        yield self._system(ts, "E")
        yield self._system(ts, "C")

    def _instruments(self, rng: random.Random) -> tuple[list[_Sym], list[float]]:
        """The day's instruments and the cumulative weights of their activity."""
        names = symbol_names(self.n, self.seed)
        syms = [
            _Sym(i + 1, name, rng.randrange(10, 400) * 10000, symbol_key(name))
            for i, name in enumerate(names)
        ]
        # Zipf-like activity: a few names carry most of the flow, as on a real tape.
        weights = [1.0 / (i + 1) ** 0.8 for i in range(self.n)]
        total_w = sum(weights)
        weights = [w * self.n / total_w for w in weights]
        cum = []
        acc = 0.0
        for w in weights:
            acc += w
            cum.append(acc)
        return syms, cum

    def _second(
        self, rng: random.Random, syms: list[_Sym], cum: list[float], second: int
    ) -> Iterator[RawMessage]:
        """One second's events: a Poisson count at the session's rate, at random instants."""
        lam = self.rate * self.n * sessions.relative_rate(second, self.close)
        k = _poisson(rng, lam)
        if not k:
            return
        offsets = sorted(rng.randrange(NS) for _ in range(k))
        for off in offsets:
            ts = second * NS + off
            s = syms[_pick(rng, cum)]
            yield from self._event(rng, s, ts, second)

    def _directory(self, s: _Sym) -> itch.StockDirectory:
        return itch.StockDirectory(
            s.locate, self._next_tracking(), sessions.PRE_MARKET_START * NS, s.stock, "Q", "N",
            100, "N", "C", "Z ", "P", "N", "N", "2", "N", 0, "N",
        )  # fmt: skip

    def _crosses(
        self, rng: random.Random, syms: list[_Sym], ts: int, cross_type: str
    ) -> Iterator[RawMessage]:
        for s in syms:
            self._match += 1
            shares = rng.randrange(1, 200) * 100
            cross = itch.CrossTrade(
                s.locate, self._next_tracking(), ts, shares, s.stock, s.mid, self._match,
                cross_type,
            )  # fmt: skip
            yield self._msg(ts, cross, s.key)

    def _event(self, rng: random.Random, s: _Sym, ts: int, second: int) -> Iterator[RawMessage]:
        """One event of ``s``: an imbalance indicator before a cross, else an order's life
        (add, delete, cancel, replace, execution) or a hidden trade."""
        tr = self._next_tracking()
        n_orders = len(s.orders)
        # Imbalance indicators in the ten minutes before each cross.
        if (
            sessions.OPEN - 600 <= second < sessions.OPEN or self.close - 600 <= second < self.close
        ) and rng.random() < 0.05:
            yield self._imbalance(rng, s, ts, tr, second)
            return
        if rng.random() < 0.02:
            s.mid = max(TICK * 10, s.mid + rng.choice((-TICK, TICK)))
        r = rng.random()
        if n_orders < 6 or (n_orders < 60 and r < 0.45):
            yield from self._add(rng, s, ts, tr)
        elif r < 0.65 or (n_orders >= 60 and r < 0.7):
            ref = rng.choice(list(s.orders))
            del s.orders[ref]
            yield self._msg(ts, itch.OrderDelete(s.locate, tr, ts, ref), s.key)
        elif r < 0.73:
            yield self._cancel(rng, s, ts, tr)
        elif r < 0.83:
            yield self._replace(rng, s, ts, tr)
        elif r < 0.96:
            yield from self._execute(rng, s, ts, tr)
        else:
            self._match += 1
            shares = rng.randrange(1, 20) * 100
            hidden = itch.Trade(s.locate, tr, ts, 0, "B", shares, s.stock, s.mid, self._match)
            yield self._msg(ts, hidden, s.key)

    def _imbalance(self, rng: random.Random, s: _Sym, ts: int, tr: int, second: int) -> RawMessage:
        paired = rng.randrange(0, 500) * 100
        imb = rng.randrange(0, 200) * 100
        cross = "O" if second < sessions.OPEN else "C"
        noii = itch.Noii(
            s.locate, tr, ts, paired, imb, rng.choice("BSNO"), s.stock, s.mid, s.mid, s.mid,
            cross, "L",
        )  # fmt: skip
        return self._msg(ts, noii, s.key)

    def _cancel(self, rng: random.Random, s: _Sym, ts: int, tr: int) -> RawMessage:
        ref = rng.choice(list(s.orders))
        o = s.orders[ref]
        if o[2] <= 100:
            del s.orders[ref]
            return self._msg(ts, itch.OrderDelete(s.locate, tr, ts, ref), s.key)
        cut = rng.randrange(1, o[2] // 100) * 100
        o[2] -= cut
        return self._msg(ts, itch.OrderCancel(s.locate, tr, ts, ref, cut), s.key)

    def _replace(self, rng: random.Random, s: _Sym, ts: int, tr: int) -> RawMessage:
        ref = rng.choice(list(s.orders))
        is_bid = bool(s.orders.pop(ref)[0])
        price = self._passive_price(rng, s, is_bid)
        shares = rng.randrange(1, 10) * 100
        self._ref += 1
        s.orders[self._ref] = [int(is_bid), price, shares]
        m = itch.OrderReplace(s.locate, tr, ts, ref, self._ref, shares, price)
        return self._msg(ts, m, s.key)

    def _execute(self, rng: random.Random, s: _Sym, ts: int, tr: int) -> Iterator[RawMessage]:
        """A marketable order arrives and takes liquidity at the best price."""
        hit_bid = rng.random() < 0.5
        side_orders = [(ref, o) for ref, o in s.orders.items() if bool(o[0]) == hit_bid]
        if not side_orders:
            yield from self._add(rng, s, ts, tr)
            return
        best = (max if hit_bid else min)(o[1] for _, o in side_orders)
        ref, o = next((ref, o) for ref, o in side_orders if o[1] == best)
        qty = o[2] if rng.random() < 0.6 else rng.randrange(1, max(2, o[2] // 100)) * 100
        qty = min(qty, o[2])
        self._match += 1
        m: itch.ItchMessage
        if rng.random() < 0.15:
            price = o[1] + (-TICK if hit_bid else TICK) * rng.randrange(0, 2)
            printable = "Y" if rng.random() < 0.9 else "N"
            m = itch.OrderExecutedWithPrice(
                s.locate, tr, ts, ref, qty, self._match, printable, max(TICK, price)
            )
        else:
            m = itch.OrderExecuted(s.locate, tr, ts, ref, qty, self._match)
        yield self._msg(ts, m, s.key)
        o[2] -= qty
        if o[2] == 0:
            del s.orders[ref]

    def _passive_price(self, rng: random.Random, s: _Sym, is_bid: bool) -> int:
        # Rest strictly behind the opposite side: the venue's matching engine
        # never leaves a locked or crossed book, so neither does the model.
        depth = 1 + min(int(rng.expovariate(0.5)), 20)
        if is_bid:
            asks = [o[1] for o in s.orders.values() if not o[0]]
            p = s.mid - depth * TICK
            if asks:
                p = min(p, min(asks) - TICK)
        else:
            bids = [o[1] for o in s.orders.values() if o[0]]
            p = s.mid + depth * TICK
            if bids:
                p = max(p, max(bids) + TICK)
        return max(TICK, p)

    def _add(self, rng: random.Random, s: _Sym, ts: int, tr: int) -> Iterator[RawMessage]:
        is_bid = rng.random() < 0.5
        price = self._passive_price(rng, s, is_bid)
        shares = rng.randrange(1, 10) * 100
        self._ref += 1
        s.orders[self._ref] = [is_bid, price, shares]
        side = "B" if is_bid else "S"
        if rng.random() < 0.1:
            mpid = rng.choice(("GSCO", "MSCO", "JPMS", "CDRG"))
            m: itch.ItchMessage = itch.AddOrderMpid(
                s.locate, tr, ts, self._ref, side, shares, s.stock, price, mpid
            )
        else:
            m = itch.AddOrder(s.locate, tr, ts, self._ref, side, shares, s.stock, price)
        yield self._msg(ts, m, s.key)


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:
        # Normal approximation: exact sampling is O(lam) and the peak is thousands/s.
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit = math.exp(-lam)
    k = 0
    p = rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _pick(rng: random.Random, cum: list[float]) -> int:
    x = rng.random() * cum[-1]
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo
