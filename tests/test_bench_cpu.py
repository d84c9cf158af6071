"""The handler bench reads the machine's CPU use and steal beside each latency pass."""

from __future__ import annotations

import time
from pathlib import Path

from bench.cpu import CpuTimes, shares

# user nice system idle iowait irq softirq steal guest guest_nice
_LINE = "cpu  1000 50 300 8000 100 0 40 10 7 0\ncpu0 500 25 150 4000 50 0 20 5 3 0\n"


def test_the_totals_are_read_from_the_first_line(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(_LINE)
    assert CpuTimes.now(stat) == CpuTimes(busy=1000 + 50 + 300 + 0 + 40, idle=8100, steal=10)


def test_an_unreadable_stat_gives_no_reading(tmp_path: Path) -> None:
    assert CpuTimes.now(tmp_path / "missing") is None
    odd = tmp_path / "stat"
    odd.write_text("intr 1 2 3\n")
    assert CpuTimes.now(odd) is None
    assert shares(None, CpuTimes(1, 1, 0)) is None


def test_shares_of_an_interval() -> None:
    got = shares(CpuTimes(100, 300, 0), CpuTimes(160, 330, 10))
    assert got is not None
    assert (got.busy, got.stolen) == (0.6, 0.1)
    assert str(got) == "CPU busy 60%, stolen 10.0%"


def test_a_busy_interval_on_this_machine_shows_busy_time() -> None:
    before = CpuTimes.now()
    assert before is not None  # the tests run on Linux
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    got = shares(before, CpuTimes.now())
    assert got is not None
    assert got.busy > 0 and 0 <= got.stolen <= 1 - got.busy
