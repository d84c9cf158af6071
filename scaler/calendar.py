"""Session floor: a minimum handler count per trading session, from the exchange calendar.

Market-data load is known in advance in a way lag is not: the open burst comes
at 09:30 whether or not the lag has started to grow. The calendar (holidays
and early closes from ``exchange_calendars``) says which session is in force;
``core.sessions`` says where the session boundaries lie inside a day, so the
scaler and the synthetic feed share one notion of the day.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from zoneinfo import ZoneInfo

import exchange_calendars as xcals

from core.sessions import AFTER_HOURS_END, CLOSE, OPEN, PRE_MARKET_START, Session

# Static fallback floors, sized for the default synthetic day; the simulator's
# policy learns its floors from earlier days instead (scaler.floors), and real
# deployments set these from their own day (TICKSCALE_SCALER_SESSION_MIN).
DEFAULT_SESSION_MIN: dict[Session, int] = {
    Session.CLOSED: 0,
    Session.PRE_MARKET: 1,
    Session.OPEN: 12,
    Session.MIDDAY: 1,
    Session.CLOSE: 8,
    Session.AFTER_HOURS: 1,
}


class CalendarError(ValueError):
    """Unknown calendar name, or a date outside the calendar's range."""


@lru_cache(maxsize=8)
def _calendar(name: str) -> xcals.ExchangeCalendar:
    try:
        return xcals.get_calendar(name)
    except xcals.errors.InvalidCalendarName as e:
        raise CalendarError(f"unknown exchange calendar {name!r}") from e


def check_calendar(name: str) -> None:
    """Raise CalendarError unless ``name`` is a calendar exchange_calendars knows."""
    _calendar(name)


@dataclass(frozen=True)
class DayInfo:
    date: dt.date
    is_session: bool
    open_s: int  # seconds since local midnight
    close_s: int  # 13:00 on early-close days


def session_of(t: float, info: DayInfo) -> Session:
    """Session at ``t`` seconds since midnight on ``info``'s day, from its real open and close."""
    if not info.is_session or t < PRE_MARKET_START or t >= AFTER_HOURS_END:
        return Session.CLOSED
    if t < info.open_s:
        return Session.PRE_MARKET
    if t < info.open_s + 1800:
        return Session.OPEN
    if t < info.close_s - 1800:
        return Session.MIDDAY
    if t < info.close_s:
        return Session.CLOSE
    return Session.AFTER_HOURS


def boundaries(info: DayInfo) -> tuple[int, ...]:
    """Seconds since midnight at which a new session starts on ``info``'s day."""
    o, c = info.open_s, info.close_s
    return (PRE_MARKET_START, o, o + 1800, c - 1800, c, AFTER_HOURS_END)


@dataclass(frozen=True)
class SessionFloor:
    session: Session  # the session that set the floor (may be the one ``lead`` ahead)
    now_session: Session
    handlers: int
    day: DayInfo


class SessionCalendar:
    """Which session is in force at a time, and the handler floor it asks for."""

    def __init__(
        self,
        name: str = "XNYS",
        session_min: Mapping[Session, int] | None = None,
        lead_s: float = 120.0,
    ) -> None:
        """:param name: exchange_calendars code (XNYS, XNAS, ...).
        :param session_min: minimum handlers per session; missing sessions get 0.
        :param lead_s: start raising the floor this long before the next session.
        """
        self.name = name
        self._cal = _calendar(name)
        self.tz = ZoneInfo(str(self._cal.tz))
        self.session_min = dict(DEFAULT_SESSION_MIN if session_min is None else session_min)
        self.lead_s = lead_s
        self._days: dict[dt.date, DayInfo] = {}

    def day(self, date: dt.date) -> DayInfo:
        info = self._days.get(date)
        if info is not None:
            return info
        ts = date.isoformat()
        if not (self._cal.first_session.date() <= date <= self._cal.last_session.date()):
            # Outside the calendar's range (about a year ahead): assume a normal
            # weekday rather than fail a running scaler on New Year.
            info = DayInfo(date, date.weekday() < 5, OPEN, CLOSE)
        elif not self._cal.is_session(ts):
            info = DayInfo(date, False, OPEN, CLOSE)
        else:
            o = self._cal.session_open(ts).tz_convert(self.tz)
            c = self._cal.session_close(ts).tz_convert(self.tz)
            info = DayInfo(date, True, o.hour * 3600 + o.minute * 60, c.hour * 3600 + c.minute * 60)
        self._days[date] = info
        return info

    def session(self, when: float) -> tuple[Session, DayInfo]:
        """Session at unix time ``when`` (holidays and weekends are CLOSED all day)."""
        local = dt.datetime.fromtimestamp(when, tz=self.tz)
        info = self.day(local.date())
        if not info.is_session:
            return Session.CLOSED, info
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        t = (local - midnight).total_seconds()
        return session_of(t, info), info

    def floor(self, when: float, lead_s: float | None = None) -> SessionFloor:
        """Handler floor at ``when``: the highest minimum of any session from now to ``lead_s``
        ahead (every session that starts inside the window counts, not only the one in
        force at its end).

        Looking ahead is what pre-scales: handlers are started, joined and
        rebalanced before the open burst arrives instead of after the lag shows it.
        """
        now_s, info = self.session(when)
        lead = self.lead_s if lead_s is None else lead_s
        best, n_best = now_s, self.session_min.get(now_s, 0)
        midnight = self.local_midnight(info.date)
        starts = [midnight + b for b in boundaries(info) if when < midnight + b <= when + lead]
        for t in [*starts, when + lead]:
            s_ahead, _ = self.session(t)
            n = self.session_min.get(s_ahead, 0)
            if n > n_best:
                best, n_best = s_ahead, n
        return SessionFloor(best, now_s, n_best, info)

    def local_midnight(self, date: dt.date) -> float:
        """Unix time of local midnight starting ``date``."""
        return dt.datetime.combine(date, dt.time(0), tzinfo=self.tz).timestamp()

    def last_session(self, before: dt.date | None = None) -> dt.date:
        """Most recent trading session on or before ``before`` (default: today)."""
        d = before or dt.datetime.now(tz=self.tz).date()
        for _ in range(30):
            if self.day(d).is_session:
                return d
            d -= dt.timedelta(days=1)
        raise CalendarError(f"no session in the 30 days before {before}")


def parse_session_min(spec: str | Mapping[str, int]) -> dict[Session, int]:
    """``"open=8,close=4"`` or a mapping -> per-session minimum; others keep defaults."""
    out = dict(DEFAULT_SESSION_MIN)
    items: list[tuple[str, int]]
    if isinstance(spec, str):
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, val = part.partition("=")
            if not sep:
                raise ValueError(f"expected SESSION=N, got {part!r}")
            try:
                items.append((key.strip(), int(val)))
            except ValueError:
                raise ValueError(f"expected an integer in {part!r}") from None
    else:
        items = list(spec.items())
    for key, n in items:
        try:
            s = Session(key)
        except ValueError:
            names = ", ".join(x.value for x in Session)
            raise ValueError(f"unknown session {key!r} (one of {names})") from None
        if n < 0:
            raise ValueError(f"session minimum for {key} must be >= 0")
        out[s] = n
    return out
