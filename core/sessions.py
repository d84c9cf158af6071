"""US-equity trading sessions and the intraday shape of message rates.

Times are seconds since midnight, exchange local time (America/New_York).
The rate curve is relative (midday = 1.0); it drives the synthetic day and the
scaler's offline backtest, so both see the same U-shaped day.
"""

from __future__ import annotations

import math
from enum import StrEnum

PRE_MARKET_START = 4 * 3600
OPEN = 9 * 3600 + 30 * 60
CLOSE = 16 * 3600
EARLY_CLOSE = 13 * 3600
AFTER_HOURS_END = 20 * 3600
DAY_SECONDS = 24 * 3600


class Session(StrEnum):
    CLOSED = "closed"
    PRE_MARKET = "pre_market"
    OPEN = "open"  # first 30 minutes of regular trading
    MIDDAY = "midday"
    CLOSE = "close"  # last 30 minutes, into the closing cross
    AFTER_HOURS = "after_hours"


def session_at(t: float, close: int = CLOSE) -> Session:
    """Session in force at ``t`` seconds since midnight for a day closing at ``close``."""
    if t < PRE_MARKET_START or t >= AFTER_HOURS_END:
        return Session.CLOSED
    if t < OPEN:
        return Session.PRE_MARKET
    if t < OPEN + 1800:
        return Session.OPEN
    if t < close - 1800:
        return Session.MIDDAY
    if t < close:
        return Session.CLOSE
    return Session.AFTER_HOURS


def relative_rate(t: float, close: int = CLOSE) -> float:
    """Message rate at ``t`` relative to the midday rate (1.0).

    Regular hours follow a U: about 8x midday in the first minutes after the
    open, decaying over ~20 minutes, rising again into the close to ~6x, with
    spikes at the opening and closing crosses. Pre-market and after-hours are
    thin (0.05-0.2x). Shape follows the published intraday volume profile of
    US equities; absolute scale is set by the caller.
    """
    if t < PRE_MARKET_START or t >= AFTER_HOURS_END:
        return 0.0
    if t < OPEN:
        # Thin pre-market that picks up in the last half hour before the open.
        ramp = max(0.0, (t - (OPEN - 1800)) / 1800)
        return 0.05 + 0.45 * ramp * ramp
    if t < close:
        since_open = t - OPEN
        to_close = close - t
        open_burst = 7.0 * math.exp(-since_open / 600.0)
        close_ramp = 5.0 * math.exp(-to_close / 900.0)
        cross = 0.0
        if since_open < 10:
            cross += 12.0  # opening cross print and the burst of quotes around it
        if to_close < 10:
            cross += 10.0
        return 1.0 + open_burst + close_ramp + cross
    # After hours: a tail of post-close activity decaying to a trickle.
    since_close = t - close
    return 0.1 + 0.9 * math.exp(-since_close / 900.0)
