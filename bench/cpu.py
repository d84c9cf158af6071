"""What the machine's CPUs did over an interval, from Linux's ``/proc/stat``.

The latency step shares two cores between the broker, the feed and the
handler, and a VM's host can take CPU time from all three at once (steal).
A pass's figures are read beside these, so a slow pass can be told apart
from a slow pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_STAT = Path("/proc/stat")


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """Cumulative clock ticks of all CPUs since boot."""

    busy: int  # user, nice, system, irq, softirq (guest time is inside user)
    idle: int  # idle, iowait
    steal: int  # taken by the hypervisor for other guests

    @classmethod
    def now(cls, stat: Path = _STAT) -> CpuTimes | None:
        """The current totals; None where there is no ``/proc/stat``."""
        try:
            first = stat.read_text().splitlines()[0].split()
        except (OSError, IndexError):
            return None
        if first[0] != "cpu" or len(first) < 9:
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, first[1:9])
        return cls(user + nice + system + irq + softirq, idle + iowait, steal)


@dataclass(frozen=True, slots=True)
class CpuShares:
    busy: float  # of all CPUs' time in the interval, 0..1
    stolen: float

    def __str__(self) -> str:
        return f"CPU busy {self.busy:.0%}, stolen {self.stolen:.1%}"


def shares(before: CpuTimes | None, after: CpuTimes | None) -> CpuShares | None:
    """How the CPUs' time between two readings was spent."""
    if before is None or after is None:
        return None
    busy = after.busy - before.busy
    total = busy + (after.idle - before.idle) + (after.steal - before.steal)
    if total <= 0:
        return None
    return CpuShares(busy / total, (after.steal - before.steal) / total)
