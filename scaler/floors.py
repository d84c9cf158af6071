"""Session floors learned from earlier days' rates at the same time of the trading day.

A constant floor per session is sized for one day's volume; a quiet day then
pays for the open of a normal one. Instead the scaler keeps, per minute of the
trading day, the rates earlier days saw, and pre-scales for what they predict
over the whole lead window, scaled by how today compares so far.

Minutes are counted from the calendar's open in the morning and from its close
in the afternoon, so an early close (known to the calendar) lines its closing
burst up with a normal day's. Days the calendar says are not sessions get no
floor: the reactive signals carry them.
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from scaler.calendar import DayInfo

BUCKET_S = 60


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
        """Today's ingest at ``t``: keeps the observed/expected scale current."""
        if not info.is_session:
            return
        acc = self._today.setdefault((info.date, *bucket(t, info)), [0.0, 0.0])
        acc[0] += ingest_rate
        acc[1] += 1
        self._recent.append((t, ingest_rate, self.expected(t, info)))
        while self._recent and self._recent[0][0] < t - self.scale_window_s:
            self._recent.popleft()

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
        if not info.is_session or not self.ready:
            return 0.0
        step = BUCKET_S
        points = [t + k * step for k in range(int(lead_s // step) + 1)] + [t + lead_s]
        return max(self.expected(p, info) for p in points) * self.scale()
