"""The load test's live view: one status line of the replayed day, the scaler's
events as they happen, and the run stopped when the group stays empty."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table

from core.sessions import session_at
from tickscale.loadtest import chaos as chaos_mod
from tickscale.loadtest.errors import RunError
from tickscale.loadtest.report import market_midnight
from tickscale.loadtest.sampler import ReplayClock, Sampler
from tickscale.loadtest.scenarios import hhmmss
from tickscale.loadtest.watch import NoMembers


class LiveView:
    def __init__(
        self,
        console: Console,
        clock: ReplayClock,
        sampler: Callable[[], Sampler | None],
        no_members: NoMembers,
    ) -> None:
        self.console = console
        self.clock = clock
        self.sampler = sampler  # the run's, once it started
        self.no_members = no_members
        self._printed_events = 0

    def on_chaos(self, ev: chaos_mod.ChaosEvent) -> None:
        style = "yellow" if ev.ok else "red"
        self.console.print(f"[{style}]chaos {ev.kind} at +{ev.at_s:g}s: {ev.detail}")

    def tick(self, live: Live | None) -> None:
        sampler = self.sampler()
        assert sampler is not None
        last = sampler.last
        if last is not None:
            reason = self.no_members.observe(last)
            if reason is not None:
                raise RunError(reason)
        evs = sampler.events
        for e in evs[self._printed_events :]:
            self.console.print(f"[cyan]scale {e.get('from')} -> {e.get('to')} ({e.get('signal')})")
        self._printed_events = len(evs)
        if live is not None:
            live.update(self.status())

    def status(self) -> Table:
        sampler = self.sampler()
        s = sampler.last if sampler else None
        t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        for col in ("market", "session", "replayed", "in/s", "out/s", "lag s", "lag msgs",
                    "handlers", "ticks", "dead letters", "p99 s"):  # fmt: skip
            t.add_column(col, justify="right")
        m = self.clock.market_at(time.time()) if self.clock.walls else None
        clock = "-" if m is None else hhmmss(m - market_midnight(m))
        session = "-" if m is None else session_at(m - market_midnight(m)).value

        def f(v: float | int | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        if s is None:
            t.add_row(clock, session, f"{self.clock.msgs:,}", *["-"] * 8)
        else:
            t.add_row(
                clock, session, f"{self.clock.msgs:,}", f(s.ingest_rate, ",.0f"),
                f(s.process_rate, ",.0f"), f(s.lag_s, ".1f"), f(s.lag_msgs, ","),
                str(s.handlers), f"{s.ticks:,}", f"{s.deadletters:,}", f(s.lat_p99, ".3f"),
            )  # fmt: skip
        return t
