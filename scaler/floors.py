"""Session floors learned from earlier days' rates at the same time of the trading day.

A constant floor per session is sized for one day's volume; a quiet day then
pays for the open of a normal one. Instead the scaler keeps, per minute of the
trading day, the rates earlier days saw, and pre-scales for what they predict
over the whole lead window, scaled by how today compares so far.

Minutes are counted from the calendar's open in the morning and from its close
in the afternoon, so an early close (known to the calendar) lines its closing
burst up with a normal day's.

A day the calendar says is not a session gets no floor, unless the feed runs
anyway: when its rate over the last ``active_min_s`` has been at least
``active_ratio`` of what a session day sees at those times of day (the
calendar's regular open and close), the calendar is wrong about today (a
holiday the exchange kept open, a replayed session on a closed date) and the
day is floored as a regular session.
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from core.sessions import CLOSE, OPEN
from scaler.calendar import DayInfo

BUCKET_S = 60


def _abs_s(date: dt.date, t: float) -> float:
    """``t`` seconds since ``date``'s midnight on one clock across days (for windows that
    must not mix yesterday's evening into today's morning)."""
    return date.toordinal() * 86400.0 + t


def regular(info: DayInfo) -> DayInfo:
    """``info`` as a regular session: what a closed day that trades anyway is compared to."""
    return info if info.is_session else DayInfo(info.date, True, OPEN, CLOSE)


def bucket(t: float, info: DayInfo) -> tuple[str, int]:
    """(anchor, minute) of ``t`` seconds since midnight: anchored on the open or the close."""
    if t < (info.open_s + info.close_s) / 2:
        return "o", int((t - info.open_s) // BUCKET_S)
    return "c", int((t - info.close_s) // BUCKET_S)


@dataclass
class LearnedFloors:
    """Per-minute rate history of the last ``days`` sessions, and today's scale against it.

    :param quantile: which of the earlier days' rates a minute expects (high: a floor
        should cover a busy day, the reactive signals trim it).
    :param scale_window_s: today's scale is observed / expected over this much recent time.
    """

    days: int = 20
    quantile: float = 0.8
    scale_window_s: float = 1800.0
    scale_bounds: tuple[float, float] = (0.2, 3.0)
    # Earlier days needed before the floors are trusted over the static ones.
    min_days: int = 1
    # A closed day whose feed ran at this share of a session's rate for this long is one.
    active_ratio: float = 0.5
    active_min_s: float = 600.0
    history: dict[tuple[str, int], deque[float]] = field(default_factory=dict)
    # Days learned so far (each ``learn`` or ``learn_means`` call is one).
    days_seen: int = 0
    _recent: deque[tuple[float, float, float]] = field(default_factory=deque)
    # Observed rates per (day, bucket), [sum, count], until taken for the history.
    _today: dict[tuple[dt.date, str, int], list[float]] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.days_seen >= self.min_days and bool(self.history)

    def learn(self, info: DayInfo, start_s: int, rates: Sequence[float]) -> None:
        """Add one finished day (``rates`` per second from ``start_s``) to the history."""
        if not info.is_session:
            return
        sums: dict[tuple[str, int], list[float]] = {}
        for i, r in enumerate(rates):
            acc = sums.setdefault(bucket(start_s + i, info), [0.0, 0.0])
            acc[0] += r
            acc[1] += 1
        self.learn_means({key: total / n for key, (total, n) in sums.items()})

    def learn_means(self, means: dict[tuple[str, int], float]) -> None:
        """Add one earlier day (or part of one) as its mean rate per bucket."""
        for key, mean in means.items():
            self.history.setdefault(key, deque(maxlen=self.days)).append(mean)
        self.days_seen += 1

    def expected(self, t: float, info: DayInfo) -> float:
        h = self.history.get(bucket(t, info))
        if not h:
            return 0.0
        ordered = sorted(h)
        return ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]

    def observe(self, t: float, info: DayInfo, ingest_rate: float) -> None:
        """Today's ingest at ``t``: keeps the observed/expected scale current. Only the
        calendar's sessions are kept for the history."""
        if info.is_session:
            acc = self._today.setdefault((info.date, *bucket(t, info)), [0.0, 0.0])
            acc[0] += ingest_rate
            acc[1] += 1
        now = _abs_s(info.date, t)
        self._recent.append((now, ingest_rate, self.expected(t, regular(info))))
        while self._recent and self._recent[0][0] < now - self.scale_window_s:
            self._recent.popleft()

    def trades_anyway(self, t: float, info: DayInfo) -> bool:
        """A day the calendar calls closed whose feed has run like a session's (see module)."""
        if info.is_session:
            return False
        now = _abs_s(info.date, t)
        seen = [(w, o, e) for w, o, e in self._recent if w >= now - self.scale_window_s]
        if not seen or seen[-1][0] - seen[0][0] < self.active_min_s:
            return False
        exp = sum(e for _, _, e in seen)
        return exp > 0 and sum(o for _, o, _ in seen) >= self.active_ratio * exp

    def take_today(self) -> dict[tuple[dt.date, str, int], tuple[float, int]]:
        """Observations since the last call, (sum, count) per (day, bucket), for keeping."""
        taken = {k: (v[0], int(v[1])) for k, v in self._today.items()}
        self._today.clear()
        return taken

    def scale(self) -> float:
        obs = sum(o for _, o, _ in self._recent)
        exp = sum(e for _, _, e in self._recent)
        lo, hi = self.scale_bounds
        if exp <= 0 or len(self._recent) < 2:
            return 1.0
        return min(max(obs / exp, lo), hi)

    def rate_ahead(self, t: float, info: DayInfo, lead_s: float) -> float:
        """The highest expected rate from ``t`` to ``t + lead_s``, scaled to today."""
        if not self.ready:
            return 0.0
        if not info.is_session:
            if not self.trades_anyway(t, info):
                return 0.0
            info = regular(info)
        step = BUCKET_S
        points = [t + k * step for k in range(int(lead_s // step) + 1)] + [t + lead_s]
        return max(self.expected(p, info) for p in points) * self.scale()
