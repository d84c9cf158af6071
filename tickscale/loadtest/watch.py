"""Fail fast: a run whose group has no members while records wait is not going to drain.

Without this a run whose handlers are all gone (a scaler killed with nobody to restart it,
handlers crash-looping) waits out its whole drain timeout and then reports a verdict about a
fleet that did not exist. ``NoMembers`` follows the samples and names the problem once the
group has been empty for ``limit_s`` while lag is above zero.

Samples where the broker could not be read (a broker drill) neither start nor end the clock:
an unknown membership is not evidence either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from tickscale.loadtest.sampler import Sample


@dataclass
class NoMembers:
    limit_s: float = 30.0  # 0: never
    since: float | None = None  # first sample of the current empty stretch
    _last_wall: float = 0.0

    def observe(self, s: Sample) -> str | None:
        """The reason to abort the run, or None; each sample is looked at once."""
        if self.limit_s <= 0 or s.wall <= self._last_wall:
            return None
        self._last_wall = s.wall
        if s.members is None or s.lag_msgs is None:
            return None
        if s.members > 0 or s.lag_msgs == 0:
            self.since = None
            return None
        if self.since is None:
            self.since = s.wall
        empty = s.wall - self.since
        if empty < self.limit_s:
            return None
        return (
            f"the handlers' group has had no members for {empty:.0f}s with "
            f"{s.lag_msgs:,} records waiting"
        )
