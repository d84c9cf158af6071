"""The scaling policy, the baseline, the calendar signal and the backtest, without a broker."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.sessions import Session
from scaler.baseline import BaselineConfig, ReactiveBaseline
from scaler.calendar import CalendarError, SessionCalendar, parse_session_min
from scaler.capacity import CapacityEstimator, HandlerStats
from scaler.lag import _EndHistory
from scaler.policy import Policy, PolicyConfig, group_throughput, handlers_for
from scaler.signals import Snapshot
from scaler.simulate import HandlerModel, backtest, synthetic_day

CAL = SessionCalendar("XNYS", lead_s=120)
DAY = dt.date(2024, 11, 25)  # a Monday session
MIDNIGHT = CAL.local_midnight(DAY)


def at(hh: int, mm: int, ss: int = 0) -> float:
    return MIDNIGHT + hh * 3600 + mm * 60 + ss


def snap(t: float, **kw: object) -> Snapshot:
    base: dict[str, object] = {
        "time": t, "partitions_hint": 12, "group_state": "Stable", "capacity": 1000.0,
        "capacity_source": "learned",
    }  # fmt: skip
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_group_throughput_is_bounded_by_the_busiest_handler() -> None:
    # 5 handlers on 12 partitions: the busiest owns 3, same as with 4 handlers.
    assert group_throughput(5, 1000, 12) == group_throughput(4, 1000, 12) == 4000
    assert group_throughput(12, 1000, 12) == 12000
    assert group_throughput(20, 1000, 12) == 12000
    assert handlers_for(4500, 1000, 12, 12) == 6  # 5 would give only 4000
    assert handlers_for(0, 1000, 12, 12) == 0


def test_rate_signal_provisions_headroom() -> None:
    p = Policy(PolicyConfig(min_handlers=1, max_handlers=12, headroom=0.25))
    d = p.decide(snap(at(12, 0), ingest_rate=3000, members=1), at(12, 0), 1)
    assert d.proposals["rate"] == 4  # 3750 msgs/s needs 4 x 1000
    assert d.reason == "rate" and d.action == "up" and d.desired == 4


def test_lag_signal_drains_the_backlog_within_the_target() -> None:
    p = Policy(PolicyConfig(lag_target_s=5, max_handlers=12))
    # 1000 msgs/s arriving, 20 000 behind: (1000 + 20000/5) = 5000 msgs/s -> 6 (4 gives 4000).
    d = p.decide(snap(at(12, 0), ingest_rate=1000, lag_msgs=20000, lag_s=8, members=2),
                 at(12, 0), 2)  # fmt: skip
    assert d.proposals["lag"] == 6 and d.reason == "lag" and d.desired == 6


def test_young_lag_is_in_flight_work_not_backlog() -> None:
    p = Policy(PolicyConfig(lag_floor_s=1.0))
    d = p.decide(snap(at(12, 0), ingest_rate=100, lag_msgs=500, lag_s=0.3, members=1),
                 at(12, 0), 1)  # fmt: skip
    assert d.proposals["lag"] == 0 and d.desired == 1


def test_session_floor_prescales_before_the_open() -> None:
    cal = SessionCalendar("XNYS", parse_session_min("open=6,midday=1,pre_market=1"), lead_s=120)
    p = Policy(PolicyConfig(max_handlers=12), cal)
    quiet = {"ingest_rate": 10.0, "members": 1}
    assert p.decide(snap(at(9, 20), **quiet), at(9, 20), 1).desired == 1
    d = p.decide(snap(at(9, 28, 30), **quiet), at(9, 28, 30), 1)  # 90 s before the open
    assert d.reason == "session" and d.desired == 6
    assert d.inputs["session"] == "open" and d.inputs["session_now"] == "pre_market"


def test_market_clock_replaces_the_wall_clock() -> None:
    cal = SessionCalendar("XNYS", parse_session_min("open=5"), lead_s=10)
    p = Policy(PolicyConfig(), cal)
    wall = at(3, 0)  # closed on the wall clock
    s = snap(wall, market_time=at(9, 29), market_speed=60.0, ingest_rate=1.0, members=1)
    # 10 s of wall lead at 60x = 10 market minutes: 09:29 is inside it.
    assert p.decide(s, wall, 1).proposals["session"] == 5
    unknown = snap(wall, market_known=False, ingest_rate=1.0, members=1)
    assert Policy(PolicyConfig(), cal).decide(unknown, wall, 1).proposals["session"] == 0


def test_calendar_knows_holidays_and_early_closes() -> None:
    thanksgiving = dt.date(2024, 11, 28)
    assert not CAL.day(thanksgiving).is_session
    sess, _ = CAL.session(CAL.local_midnight(thanksgiving) + 10 * 3600)
    assert sess is Session.CLOSED
    black_friday = dt.date(2024, 11, 29)  # closes 13:00
    info = CAL.day(black_friday)
    assert info.is_session and info.close_s == 13 * 3600
    sess, _ = CAL.session(CAL.local_midnight(black_friday) + 12 * 3600 + 45 * 60)
    assert sess is Session.CLOSE
    with pytest.raises(CalendarError):
        SessionCalendar("NOPE")
    with pytest.raises(ValueError, match="unknown session"):
        parse_session_min("lunch=3")


def test_scale_down_waits_for_the_window_and_steps() -> None:
    cfg = PolicyConfig(scale_down_window_s=60, scale_down_interval_s=10, settle_s=2,
                       scale_down_fraction=0.5, max_handlers=12)  # fmt: skip
    p = Policy(cfg)
    t = at(12, 0)
    busy = p.decide(snap(t, ingest_rate=7000, members=8), t, 8)
    assert busy.desired == 12 or busy.action in ("up", "hold")
    current = 8
    p.last_change = t
    actions = []
    for i in range(1, 200):
        d = p.decide(snap(t + i, ingest_rate=100, members=current), t + i, current)
        if d.changes:
            actions.append((i, d.current, d.desired))
            p.applied(d)
            current = d.desired
    # First step only after the window (60 s of low proposals), then halving steps.
    assert actions[0][0] >= 60
    assert [(a, b) for _, a, b in actions] == [(8, 4), (4, 2), (2, 1)]
    assert all(b - a >= 10 for (a, _, _), (b, _, _) in itertools.pairwise(actions))


def test_no_change_while_the_group_rebalances_or_members_lag() -> None:
    p = Policy(PolicyConfig())
    t = at(12, 0)
    d = p.decide(snap(t, ingest_rate=5000, group_state="PreparingRebalance", members=1), t, 1)
    assert d.desired == 1 and d.hold == "rebalancing"
    p.last_change = t - 10
    d = p.decide(snap(t, ingest_rate=100, members=2), t, 4)  # 2 of 4 joined
    assert d.desired == 4 and d.hold == "joining"  # no removal while the last change lands


snaps = st.builds(
    lambda rate, lag, lag_s, members, state, parts: snap(
        at(12, 0), ingest_rate=rate, lag_msgs=lag, lag_s=lag_s, members=members,
        group_state=state, partitions_hint=parts,
    ),
    st.floats(0, 1e6), st.integers(0, 10**8), st.floats(0, 3600), st.integers(0, 30),
    st.sampled_from(["Stable", "Empty", "PreparingRebalance"]), st.integers(1, 64),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(snaps, st.integers(0, 30), st.integers(0, 6), st.integers(1, 40))
def test_decisions_stay_within_bounds(s: Snapshot, current: int, lo: int, extra: int) -> None:
    hi = lo + extra
    p = Policy(PolicyConfig(min_handlers=lo, max_handlers=hi), CAL)
    d = p.decide(s, s.time, current)
    upper = min(hi, s.partition_count)
    assert d.target <= upper and d.target >= min(lo, upper)
    if d.changes:
        assert d.desired <= upper
        assert d.desired >= min(lo, upper)


@settings(max_examples=50, deadline=None)
@given(st.floats(100, 11000), st.integers(1, 12), st.integers(0, 9999))
def test_steady_rate_does_not_flap(rate: float, start: int, seed: int) -> None:
    p = Policy(PolicyConfig(max_handlers=12, scale_down_window_s=30, scale_down_interval_s=5,
                            settle_s=1))  # fmt: skip
    current = start
    changes = []
    t0 = at(12, 0)
    for i in range(600):
        d = p.decide(snap(t0 + i, ingest_rate=rate, members=current), t0 + i, current)
        if d.changes:
            p.applied(d)
            changes.append(d.desired - d.current)
            current = d.desired
    # Converges and stays: never reverses direction on a constant load.
    assert all(c > 0 for c in changes) or all(c < 0 for c in changes)
    assert len(changes) <= 4


def test_reactive_baseline_follows_keda_and_hpa() -> None:
    b = ReactiveBaseline(BaselineConfig(lag_threshold=10, max_replicas=12))
    t = at(12, 0)
    # metric capped at partitions * threshold = 120 -> ceil(120/10) = 12, but a step
    # is at most max(4 pods, 100%) from 1 replica.
    d = b.decide(snap(t, lag_msgs=10_000), t, 1)
    assert d.desired == 5
    # Within the 15 s sync period nothing changes.
    assert b.decide(snap(t + 5, lag_msgs=10_000), t + 5, 5).desired == 5
    # Scale-down: the highest recommendation of the last 300 s wins.
    assert b.decide(snap(t + 16, lag_msgs=0), t + 16, 5).desired == 5
    assert b.decide(snap(t + 320, lag_msgs=0), t + 320, 5).desired == 1


def test_capacity_learns_messages_per_busy_second() -> None:
    est = CapacityEstimator(window_s=60, min_busy_s=1)
    assert est.estimate() is None
    for i in range(10):
        est.observe(HandlerStats("a", 2000 * i, 1.0 * i, 100.0 + i))  # 2000 msgs/busy s
        est.observe(HandlerStats("b", 1000 * i, 0.25 * i, 100.0 + i))  # 4000 msgs/busy s
    assert est.estimate() == pytest.approx(27000 / 11.25)
    # A restart (counters reset) starts that handler's history over.
    est.observe(HandlerStats("a", 10, 0.01, 200.0))
    assert est.estimate() == pytest.approx(9000 / 2.25)


def test_capacity_projects_to_full_batches_whatever_the_load() -> None:
    # One handler, 20 us of CPU per message and 30 ms of broker waits per batch, batches of
    # up to 2,000. Quiet: batches of 10 (a busy second is mostly waiting). Busy: full batches.
    # Both must show the same ceiling: 2000 / (0.030 + 0.00002 * 2000) = 28,571 msgs/s.
    def run(batch: int) -> float | None:
        est = CapacityEstimator(window_s=1000, min_busy_s=1)
        msgs, busy, cpu, batches = 0, 0.0, 0.0, 0
        for t in range(100):
            msgs += batch * 5
            cpu += 0.00002 * batch * 5
            busy += 0.00002 * batch * 5 + 0.030 * 5
            batches += 5
            est.observe(HandlerStats("h", msgs, busy, float(t), cpu, batches, 2000))
        return est.windowed()

    quiet, full = run(10), run(2000)
    assert quiet == pytest.approx(28_571, rel=1e-3)
    assert full == pytest.approx(28_571, rel=1e-3)
    # What messages per busy second would have said when quiet: 10 / 0.0302 = 331.
    assert 10 / (0.00002 * 10 + 0.030) == pytest.approx(331, rel=1e-2)


def test_capacity_holds_the_ceiling_seen_under_load() -> None:
    # Under load, big batches: 20,000 msgs per busy second. Then a quiet stretch whose small
    # batches are mostly transaction round trips: 500. The quiet figure is overhead, not a
    # slower handler, so the busy stretch's figure stands for hold_s.
    est = CapacityEstimator(window_s=10, min_busy_s=1, hold_s=100)
    msgs, busy = 0, 0.0
    for t in range(0, 20):
        msgs, busy = msgs + 10_000, busy + 0.5
        est.observe(HandlerStats("a", msgs, busy, float(t)))
    assert est.estimate() == pytest.approx(20_000)
    for t in range(20, 60):
        msgs, busy = msgs + 250, busy + 0.5
        est.observe(HandlerStats("a", msgs, busy, float(t)))
        assert est.estimate() == pytest.approx(20_000)
    assert est.windowed() == pytest.approx(500)
    for t in range(60, 140):
        msgs, busy = msgs + 250, busy + 0.5
        est.observe(HandlerStats("a", msgs, busy, float(t)))
        held = est.estimate()
    # A hold later only the quiet figure is left.
    assert held == pytest.approx(500)


def test_end_history_dates_a_record_between_two_sightings() -> None:
    h = _EndHistory(horizon_s=600)
    h.add(100.0, 0)
    h.add(101.0, 0)  # quiet: end still 0 a second later
    h.add(102.0, 100)
    h.add(103.0, 200)
    assert h.time_of(-1) is None  # before the history
    assert h.time_of(200) is None  # not appended yet
    assert 101.0 < h.time_of(0) <= 102.0  # type: ignore[operator]
    assert h.time_of(99) == pytest.approx(102.0)
    assert 102.0 < h.time_of(150) <= 103.0  # type: ignore[operator]


@pytest.mark.slow
def test_backtest_runs_both_policies_over_a_day() -> None:
    # A whole synthetic day (04:00-20:00) through the realistic model: both policies keep
    # up by the end and tickscale costs less than the default KEDA (lagThreshold 10),
    # which holds a large fleet on in-flight lag alone. The comparison against the tuned
    # KEDA+cron baseline is the suite's job (docs/scaler-sim.md).
    series = synthetic_day(DAY, symbols=500, seed=3)
    ours, reactive = backtest(series, CAL, HandlerModel(seed=3), lag_target_s=5.0)
    assert ours.name == "tickscale" and reactive.name == "reactive"
    assert ours.handler_seconds < reactive.handler_seconds
    assert ours.unprocessed_at_end < 1e6 and reactive.unprocessed_at_end < 1e6


@pytest.mark.slow
def test_simulate_cli_prints_both_policies_as_json_and_draws_the_chart(tmp_path: Path) -> None:
    png = tmp_path / "day.png"
    r = subprocess.run(
        [sys.executable, "-m", "tickscale", "scaler", "simulate", "--source", "synthetic",
         "--seed", "4", "--symbols", "200", "--date", "2024-11-25", "--json", "--plot", str(png)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["policies"]) == {"tickscale", "reactive"}
    for p in out["policies"].values():
        assert {"handler_seconds", "lag_above_target_s", "peak_lag_s", "scale_events"} <= set(p)
        assert p["handler_seconds"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_cli_reads_a_recorded_rate_trace(tmp_path: Path) -> None:
    trace = tmp_path / "rate.csv"
    rows = ["time,msgs_per_s"] + [f"09:{m:02d},{200 if m < 30 else 20000}" for m in range(20, 40)]
    trace.write_text("\n".join(rows) + "\n")
    r = subprocess.run(
        [sys.executable, "-m", "tickscale", "scaler", "simulate", "--source", "trace",
         "--trace", str(trace), "--date", "2024-11-25", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)["policies"]["tickscale"]
    assert ours["max_handlers"] > 1  # the step at 09:30 needed more than one handler
