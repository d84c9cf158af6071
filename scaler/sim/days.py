"""The suite's day shapes: what a calendar predicts well, and what it does not."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from core.sessions import CLOSE, EARLY_CLOSE
from scaler.simulate import RateSeries, synthetic_day

NORMAL_DATE = dt.date(2024, 11, 25)  # a Monday session
HISTORY_DATES = tuple(dt.date(2024, 11, d) for d in (18, 19, 20, 21, 22))  # the week before


@dataclass(frozen=True)
class DayShape:
    name: str
    date: dt.date  # what the calendar is asked about
    volume: float = 1.0
    close_s: int = CLOSE  # when the generated day really closes
    shift_s: int = 0  # the generated day runs this much later than the calendar's clock
    crash: tuple[int, float, float] | None = None  # (time, peak multiple - 1, decay s)

    def series(self, seed: int, symbols: int) -> RateSeries:
        return synthetic_day(
            self.date, close_s=self.close_s, symbols=symbols, seed=seed, volume=self.volume,
            shift_s=self.shift_s, crash=self.crash,
        )  # fmt: skip


SUITE: tuple[DayShape, ...] = (
    DayShape("normal", NORMAL_DATE),
    DayShape("quiet", NORMAL_DATE, volume=0.2),
    DayShape("heavy", NORMAL_DATE, volume=3.0),
    DayShape("flash_crash", NORMAL_DATE, crash=(14 * 3600 + 5 * 60, 9.0, 240.0)),
    # 2024-11-29, the Friday after Thanksgiving: XNYS closes at 13:00.
    DayShape("early_close_known", dt.date(2024, 11, 29), close_s=EARLY_CLOSE),
    # The calendar says a normal Tuesday; the market closes at 13:00 anyway.
    DayShape("early_close_unknown", dt.date(2024, 11, 26), close_s=EARLY_CLOSE),
    # Thanksgiving: no session by the calendar, a full day's load on the feed.
    DayShape("holiday_full_load", dt.date(2024, 11, 28)),
    # The feed's day runs an hour late against the calendar (a time-zone slip).
    DayShape("shifted_1h", NORMAL_DATE, shift_s=3600),
)


def shape(name: str) -> DayShape:
    for d in SUITE:
        if d.name == name:
            return d
    raise ValueError(f"unknown day {name!r} (one of {', '.join(d.name for d in SUITE)})")
