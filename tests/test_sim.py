"""The simulator's realism, the KEDA+HPA baseline's arithmetic, the suite's shape and the
policy fixes: all without a broker (pure models)."""

from __future__ import annotations

import datetime as dt
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from core.sessions import Session
from scaler.baseline import BaselineConfig, CronWindow, ReactiveBaseline
from scaler.calendar import DayInfo, SessionCalendar, parse_session_min, session_of
from scaler.capacity import SaturationCapacity
from scaler.floors import LearnedFloors
from scaler.policy import LAG_ERROR, Policy, PolicyConfig
from scaler.signals import Snapshot
from scaler.sim.engine import HandlerModel, _Fleet, group_capacity, run
from scaler.sim.pauses import BENCH_PAUSES
from scaler.sim.suite import POLICIES, THRESHOLDS, FixedFleet, aggregate, goals

CAL = SessionCalendar("XNYS", lead_s=120)
DAY = dt.date(2024, 11, 25)
MIDNIGHT = CAL.local_midnight(DAY)
NOON = MIDNIGHT + 12 * 3600


def snap(t: float, **kw: object) -> Snapshot:
    base: dict[str, object] = {"time": t, "partitions_hint": 12, "group_state": "Stable",
                               "capacity": 1000.0, "capacity_source": "learned"}  # fmt: skip
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


# --- simulator realism -------------------------------------------------------------------


def test_a_fleet_that_keeps_up_still_shows_in_flight_lag() -> None:
    # 2,000 msgs/s into a fixed fleet of 4 x 2,500: it keeps up, yet the committed offsets
    # trail by one poll-and-commit cycle, so the lag a KEDA scaler reads is never 0.
    model = HandlerModel(capacity=2500, initial=4, capacity_noise=0.0, seed=1)
    res = run([2000.0] * 300, 12 * 3600, FixedFleet(4), model, 5.0, MIDNIGHT, keep_series=True)
    assert res.lag_above_target_s == 0
    steady = res.lag_s[60:]
    assert min(steady) >= model.commit_cycle_s - 1e-9 and max(steady) < 1.0


def test_default_keda_holds_a_large_fleet_on_in_flight_lag_instead_of_sawing() -> None:
    # lagThreshold 10 against ~200 in-flight messages: ceil(200/10) = 20 -> capped at the
    # 12 partitions; the fleet climbs and stays instead of falling back to one.
    model = HandlerModel(capacity=2500, capacity_noise=0.0, seed=2)
    b = ReactiveBaseline(BaselineConfig(max_replicas=12))
    res = run([2000.0] * 900, 12 * 3600, b, model, 5.0, MIDNIGHT, keep_series=True)
    assert min(res.handlers[300:]) >= 10
    assert res.scale_events <= 6


def test_pauses_come_from_the_measured_table_and_vary() -> None:
    import random

    p = BENCH_PAUSES["docker"]
    rng = random.Random(1)
    draws = {round(p.startup(rng), 3) for _ in range(20)}
    assert len(draws) > 1 and all(p.startup_s[0] <= d <= p.startup_s[1] for d in draws)
    with pytest.raises(ValueError, match="unknown backend"):
        _ = HandlerModel(backend="k8s").pauses


def test_the_rebalance_pauses_cover_what_the_committed_bench_measured() -> None:
    # The simulator's pauses must not drift from the measurements they cite: every join or
    # leave the latest committed scaler bench saw stalled a moved partition within the range.
    results = sorted(Path(__file__).parent.parent.glob("bench/results/*-scaler.json"))
    events = json.loads(results[-1].read_text())["rebalances"]["events"]
    assert events
    for backend, p in BENCH_PAUSES.items():
        lo, hi = p.rebalance_s
        for e in events:
            assert lo - 0.05 <= e["stall_s"] <= hi + 0.05, (backend, e)
    starts = [e["start_to_consume_s"] - e["join_to_consume_s"] for e in events
              if e["start_to_consume_s"] is not None]  # fmt: skip
    lo, hi = BENCH_PAUSES["process"].startup_s
    assert starts and all(lo - 0.05 <= s <= hi + 0.05 for s in starts)


def test_policies_meet_the_same_handlers_for_the_same_fleet_size() -> None:
    # Common random numbers: a fleet that grew 1 -> 3 -> 5 and one that went straight to
    # 5 run on the same five capacity draws (slots), so neither is luckier than the other.
    model = HandlerModel(capacity=2500, capacity_noise=0.3, seed=4)
    caps = [2000.0, 2600.0, 3100.0, 1900.0, 2400.0, 2800.0]
    stepped = _Fleet(model, random.Random(1), list(caps))
    stepped.apply(3, 0.0)
    stepped.apply(5, 10.0)
    stepped.apply(2, 20.0)  # the youngest leave; their slots are freed
    stepped.step_membership(30.0)
    stepped.apply(5, 30.0)
    straight = _Fleet(model, random.Random(2), list(caps))
    straight.apply(5, 0.0)
    for f in (stepped, straight):
        f.step_membership(60.0)
    assert sorted(h.capacity for h in stepped.members) == sorted(caps[:5])
    assert sorted(h.capacity for h in straight.members) == sorted(caps[:5])


def test_the_group_is_as_fast_as_its_slowest_busiest_member() -> None:
    # 12 partitions on 5 members: the first two own 3, the rest 2. A slow 3-partition
    # member (1,500 msgs/s -> 500 per partition) limits the group to 6,000 msgs/s.
    assert group_capacity([1500, 3000, 3000, 3000, 3000], 12) == pytest.approx(6000)
    assert group_capacity([3000, 3000, 3000, 3000, 1500], 12) == pytest.approx(9000)
    assert group_capacity([], 12) == 0.0


def test_capacity_from_saturated_throughput_corrects_a_prior_30_percent_high() -> None:
    est = SaturationCapacity(prior=1300.0, halflife_s=60)
    for _ in range(300):  # 4 members on 12 partitions, saturated at 1,000 each
        est.observe(4000.0, 4, 12, saturated=True, dt=1.0)
    assert est.value == pytest.approx(1000, rel=0.02) and est.source == "learned"
    # Unsaturated throughput can only raise it (a proven lower bound).
    est.observe(2000.0, 4, 12, saturated=False, dt=1.0)
    assert est.value == pytest.approx(1000, rel=0.02)
    est.observe(6000.0, 4, 12, saturated=False, dt=1.0)
    assert est.value == pytest.approx(1500)


# --- KEDA + HPA arithmetic ----------------------------------------------------------------


def test_hpa_tolerance_step_limits_and_stabilisation() -> None:
    b = ReactiveBaseline(BaselineConfig(lag_threshold=100, max_replicas=12))
    t = NOON
    # 4 replicas, metric 420 -> ratio 1.05: inside the 10% tolerance, no change.
    assert b.decide(snap(t, lag_msgs=420), t, 4).desired == 4
    # 15 s sync period: nothing changes in between, whatever the metric.
    assert b.decide(snap(t + 5, lag_msgs=1100), t + 5, 4).desired == 4
    # metric 1100 -> ceil(11) = 11, but scale-up is at most max(4 pods, 100%) = 8 from 4.
    assert b.decide(snap(t + 15, lag_msgs=1100), t + 15, 4).desired == 8
    # Scale-down: the highest recommendation of the last 300 s wins.
    assert b.decide(snap(t + 30, lag_msgs=100), t + 30, 8).desired == 8
    assert b.decide(snap(t + 330, lag_msgs=100), t + 330, 8).desired == 1


def test_keda_caps_lag_at_partitions_times_threshold_unless_idle_consumers() -> None:
    capped = ReactiveBaseline(BaselineConfig(lag_threshold=10, max_replicas=64))
    assert capped.metric(snap(NOON, lag_msgs=10_000, partitions_hint=12)) == 120
    idle = ReactiveBaseline(BaselineConfig(lag_threshold=10, allow_idle_consumers=True))
    assert idle.metric(snap(NOON, lag_msgs=10_000, partitions_hint=12)) == 10_000


def test_activation_threshold_keeps_a_scaled_to_zero_fleet_asleep() -> None:
    b = ReactiveBaseline(BaselineConfig(min_replicas=0, activation_lag_threshold=50))
    assert b.decide(snap(NOON, lag_msgs=40), NOON, 0).desired == 0
    assert b.decide(snap(NOON + 30, lag_msgs=60), NOON + 30, 0).desired == 1


def test_cron_trigger_is_a_floor_the_hpa_maxes_with_lag() -> None:
    cron = (CronWindow(9 * 3600 + 28 * 60, 10 * 3600, 9),)
    b = ReactiveBaseline(BaselineConfig(lag_threshold=1000, cron=cron), "keda_cron")
    t = MIDNIGHT + 9 * 3600 + 29 * 60
    assert b.decide(snap(t, lag_msgs=10), t, 1).desired == 5  # 1 -> 5: the step limit
    assert b.decide(snap(t + 15, lag_msgs=10), t + 15, 5).desired == 9
    # Cron knows weekdays, not the exchange calendar: Thanksgiving (a Thursday) still fires.
    thanksgiving = CAL.local_midnight(dt.date(2024, 11, 28)) + 9 * 3600 + 45 * 60
    assert b.cron_replicas(thanksgiving) == 9
    assert b.cron_replicas(CAL.local_midnight(dt.date(2024, 11, 30)) + 9.75 * 3600) == 0


# --- the suite's aggregation and JSON shape -----------------------------------------------


def _row(lag: float, cost: float) -> dict[str, float]:
    return {"lag_above_target_s": lag, "handler_seconds": cost, "scale_events": 3}


def test_suite_reports_keda_at_its_best_threshold_and_the_json_shape() -> None:
    seeds = []
    for k in range(3):
        row = {"tickscale": _row(12 + k, 100), "reactive": _row(5, 400), "fixed": _row(10, 800)}
        # 50: lowest lag but expensive; 200: lag within the tie, cheaper -> best.
        sweep = {
            50: _row(20, 300),
            200: _row(21 + k, 200),
            800: _row(90, 150),
            3200: _row(300, 120),
        }
        row |= {f"keda_cron@{th}": v for th, v in sweep.items()}
        seeds.append(row)
    day = aggregate(seeds)
    assert set(day) == set(POLICIES)
    assert day["keda_cron"]["lag_threshold"] == 200
    assert day["keda_cron"]["lag_above_target_s"] == 22  # median over seeds
    # Beyond the fixed fleet's 10 s at each seed: 12-14 -> 2-4, 21-23 -> 11-13.
    assert day["tickscale"]["lag_above_fixed_s"] == 3
    assert day["keda_cron"]["lag_above_fixed_s"] == 12
    assert day["reactive"]["lag_above_fixed_s"] == 0 and day["fixed"]["lag_above_fixed_s"] == 0
    assert set(day["keda_cron"]["sweep"]) == {str(t) for t in THRESHOLDS}
    for p in POLICIES:
        assert {"lag_above_target_s", "handler_seconds", "scale_events"} <= set(day[p])
    assert goals(day) == {"lag<=0.5x keda_cron": False, "cost<=1.0x keda_cron": True,
                          "cost<=0.5x fixed": True}  # fmt: skip
    json.dumps({"days": {"normal": day}})


def test_suite_cli_rejects_an_unknown_day() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tickscale", "scaler", "simulate", "--suite", "--days", "payday"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("error:") and "payday" in r.stderr


@pytest.mark.slow
def test_suite_cli_prints_the_days_json() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tickscale", "scaler", "simulate", "--suite", "--days", "quiet",
         "--seeds", "1", "--workers", "1", "--json"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"days"} and set(out["days"]) == {"quiet"}
    for p in POLICIES:
        assert out["days"]["quiet"][p]["handler_seconds"] > 0


# --- policy fixes -------------------------------------------------------------------------


def test_sessions_follow_the_days_real_open_and_close() -> None:
    late = DayInfo(DAY, True, open_s=10 * 3600, close_s=13 * 3600)
    assert session_of(9 * 3600 + 45 * 60, late) is Session.PRE_MARKET  # 09:45: not open yet
    assert session_of(10 * 3600 + 60, late) is Session.OPEN
    assert session_of(12 * 3600 + 45 * 60, late) is Session.CLOSE
    assert session_of(13 * 3600 + 60, late) is Session.AFTER_HOURS


def test_prescaling_covers_the_whole_lead_window() -> None:
    # At 07:00 with a 3-hour lead the window ends at 10:00 (midday, floor 1) but holds the
    # open (09:30-10:00, floor 12): the floor must be the open's.
    cal = SessionCalendar("XNYS", parse_session_min("open=12,midday=1"), lead_s=3 * 3600)
    fl = cal.floor(MIDNIGHT + 7 * 3600)
    assert fl.handlers == 12 and fl.session is Session.OPEN


def _learned(info: DayInfo) -> LearnedFloors:
    floors = LearnedFloors()
    start = 9 * 3600
    for _ in range(3):  # earlier sessions: 1,000 msgs/s, 20,000 for 09:30-09:35
        rates = [20_000.0 if 9 * 3600 + 1800 <= start + i < 9 * 3600 + 2100 else 1000.0
                 for i in range(3600)]  # fmt: skip
        floors.learn(info, start, rates)
    return floors


def test_learned_floors_scale_to_today_and_look_over_the_window() -> None:
    info = CAL.day(DAY)
    floors = _learned(info)
    assert floors.rate_ahead(9 * 3600 + 1700, info, 120) == pytest.approx(20_000)
    assert floors.rate_ahead(9 * 3600 + 1500, info, 120) == pytest.approx(1000)
    for i in range(600):  # today runs at a fifth of that before the open
        floors.observe(9 * 3600 + i, info, 200.0)
    assert floors.scale() == pytest.approx(0.2)
    assert floors.rate_ahead(9 * 3600 + 1700, info, 120) == pytest.approx(4000)
    holiday = CAL.day(dt.date(2024, 11, 28))
    assert floors.rate_ahead(9 * 3600 + 1700, holiday, 120) == 0.0


@pytest.mark.parametrize(("rate", "floored"), [(900.0, True), (100.0, False)])
def test_a_closed_day_whose_feed_trades_anyway_is_floored_as_a_session(
    rate: float, floored: bool
) -> None:
    # Thanksgiving by the calendar; the feed runs before the open at 0.9x (or 0.1x) what the
    # sessions saw. Only the first is the calendar being wrong about today.
    floors = _learned(CAL.day(DAY))
    holiday = CAL.day(dt.date(2024, 11, 28))
    assert not holiday.is_session
    for i in range(0, 900, 5):
        floors.observe(9 * 3600 + i, holiday, rate)
    before_open = 9 * 3600 + 1700
    assert floors.trades_anyway(before_open, holiday) is floored
    ahead = floors.rate_ahead(before_open, holiday, 120)
    assert ahead == (pytest.approx(20_000 * 0.9) if floored else 0.0)
    # Nothing of it joins the sessions' history.
    assert floors.take_today() == {}
    # Too little seen yet (under active_min_s): not called a session.
    fresh = _learned(CAL.day(DAY))
    for i in range(0, 300, 5):
        fresh.observe(9 * 3600 + i, holiday, 900.0)
    assert not fresh.trades_anyway(9 * 3600 + 300, holiday)


def test_yesterday_does_not_weigh_on_todays_scale() -> None:
    # A scaler runs for days: the scale window is on one clock across midnight, so what
    # it saw yesterday at the same time of day has left the window (yesterday's feed
    # was down; today's runs as usual: today's scale is 1, not 0.5).
    floors = _learned(CAL.day(DAY))
    monday, tuesday = CAL.day(DAY), CAL.day(dt.date(2024, 11, 26))
    for i in range(600):
        floors.observe(9 * 3600 + i, monday, 0.0)
    for i in range(600):
        floors.observe(9 * 3600 + i, tuesday, 1000.0)
    assert floors.scale() == pytest.approx(1.0)


def test_a_failed_or_implausible_lag_read_holds_the_fleet() -> None:
    p = Policy(PolicyConfig(max_handlers=12))
    failed = snap(NOON, ingest_rate=1000, lag_msgs=500, members=2, extra={LAG_ERROR: "timeout"})
    d = p.decide(failed, NOON, 2)
    assert d.desired == 2 and d.hold == "lag-read-failed"
    p.decide(snap(NOON + 1, ingest_rate=1000, lag_msgs=500, members=2), NOON + 1, 2)
    # 10^9 messages of lag a second later at 1,000 msgs/s in: not possible -> hold.
    jump = snap(NOON + 2, ingest_rate=1000, lag_msgs=10**9, lag_s=600, members=2)
    d = p.decide(jump, NOON + 2, 2)
    assert d.desired == 2 and d.hold == "lag-jump"
    # The same reading again is confirmed and acted on.
    d = p.decide(
        snap(NOON + 3, ingest_rate=1000, lag_msgs=10**9, lag_s=600, members=2), NOON + 3, 2
    )
    assert d.desired == 12


def test_a_crash_looping_handler_does_not_freeze_scale_up() -> None:
    p = Policy(PolicyConfig(max_handlers=12, settle_s=5))
    t = NOON
    p.last_change = t - 10  # the last change is 10 s old; one of its 4 handlers never joins
    d = p.decide(snap(t, ingest_rate=9000, lag_msgs=90_000, lag_s=10, members=3), t, 4)
    assert d.action == "up" and d.desired > 4
