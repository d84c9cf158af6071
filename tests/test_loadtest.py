"""``tickscale loadtest`` through the real command, on the session's broker and Redis.

The load test starts its own scaler (process backend) and handlers; the conftest broker and
Redis are passed by address so no second broker is started.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from ingest.manifest import Manifest
from tests.pipeline_utils import holding
from tickscale.loadtest.chaos import parse_chaos
from tickscale.loadtest.feed import TimeWarp
from tickscale.loadtest.latency import Histogram, parse_buckets
from tickscale.loadtest.sampler import Sample
from tickscale.loadtest.scenarios import PlanOptions, resolve
from tickscale.loadtest.slo import lag_above, recoveries

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def loadtest(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # A killed handler's partitions wait out the group session timeout; 6 s instead of the
    # default 10 s keeps the drill short (the scaler passes its environment to its handlers).
    env = os.environ | {"TICKSCALE_HANDLER_SESSION_TIMEOUT_MS": "6000"}
    return subprocess.run(
        [sys.executable, "-m", "tickscale", "loadtest", "--no-progress", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_open_with_a_killed_handler_passes_ledger_and_slos(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    res_path = tmp_path / "result.json"
    p = loadtest(
        "--bootstrap", kafka_bootstrap, "--redis", redis_url, "--scenario", "open",
        "--from", "09:29", "--to", "09:33", "--speed", "15", "--symbols", "30", "--seed", "3",
        "--date", "2024-11-25", "--partitions", "4", "--policy", "fixed:2",
        "--malformed-every", "4000", "--chaos", "kill-handler@5",
        # The killed handler's partitions stall for the session timeout plus a rebalance and
        # a restore: lag and the tail of the latency follow from that, the median does not.
        "--slo-p50", "1", "--slo-p99", "30", "--slo-max", "30",
        "--slo-lag-p99", "25", "--slo-lag-max", "25", "--slo-recovery", "45",
        "--out", str(out), "--json", str(res_path),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-5000:]
    r = orjson.loads(res_path.read_bytes())
    assert r["ok"] and r["ledger_ok"] and r["slo_ok"] and r["drained"], r
    assert (r["missing"], r["duplicated"], r["reordered"], r["checksum_mismatch"]) == (0, 0, 0, 0)
    assert r["ticks_read"] == r["ticks_expected"] > 10_000
    assert r["deadletters"] == r["deadletters_expected"] > 0  # malformed input accounted for
    assert "ledger PASS" in p.stderr and "missing=0 duplicated=0 reordered=0" in p.stderr

    assert 0 < r["latency_p50_s"] <= r["latency_p99_s"] <= r["latency_max_s"] <= 30
    assert r["latency_observations"] > 1000
    assert 0 <= r["lag_p99_s"] <= r["lag_max_s"] <= 25
    # The kill is a real crash: lag builds while its partitions wait for the session timeout.
    assert r["lag_max_s"] > 2, r["lag_max_s"]

    (kill,) = r["chaos"]
    assert kill["kind"] == "kill-handler" and kill["ok"], kill
    assert "SIGKILL" in kill["detail"]
    assert not Path(f"/proc/{kill['extra']['pid']}/cmdline").exists()
    (rec,) = r["recoveries"]
    assert rec["recovery_s"] is not None and rec["recovery_s"] <= 45
    assert r["recovery_s"] == rec["recovery_s"]
    # The scaler started two, then replaced the killed one: both changes are in its audit.
    moves = [(e["from"], e["to"]) for e in r["scale_events"]]
    assert (0, 2) in moves and (1, 2) in moves, moves

    # A fixed fleet of two: at most the peak-sized fleet's cost. (The scaler may replace the
    # killed handler between two once-a-second samples, so no sample need see one alone.)
    assert r["peak_handlers"] == 2
    assert r["fixed_peak_handler_seconds"] == pytest.approx(2 * r["duration_s"], rel=0.01)
    assert 0 < r["handler_seconds"] <= r["fixed_peak_handler_seconds"]
    assert r["handler_seconds_ratio"] == pytest.approx(
        r["handler_seconds"] / r["fixed_peak_handler_seconds"], rel=0.01
    )

    report = Path(r["report"])
    assert report == out / "report.html"
    html = report.read_text()
    assert html.count("data:image/png;base64,") == 4
    assert "ledger PASS" in html and "kill-handler" in html
    for name in ("rate", "lag", "handlers", "latency"):
        assert (out / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert orjson.loads((out / "results.json").read_bytes())["run_id"] == r["run_id"]
    # Handlers stopped with the scaler: nothing left in its targets file.
    assert orjson.loads((out / "scaler" / "targets.json").read_bytes()) == []


@pytest.mark.slow
def test_an_impossible_slo_fails_the_run_with_exit_status_1(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    res_path = tmp_path / "result.json"
    p = loadtest(
        "--bootstrap", kafka_bootstrap, "--redis", redis_url, "--from", "04:00", "--to", "05:00",
        "--speed", "max", "--symbols", "20", "--date", "2024-11-25", "--partitions", "2",
        "--policy", "fixed:1", "--slo-p99", "0.0001", "--out", str(tmp_path / "run"),
        "--json", str(res_path), "--only", "JQK,XP,EE",
    )  # fmt: skip
    assert p.returncode == 1, p.stderr[-5000:]
    r = orjson.loads(res_path.read_bytes())
    # Three of the day's twenty instruments were replayed, and the ledger is theirs.
    assert r["only"] == ["EE", "JQK", "XP"]
    assert set(Manifest.read(tmp_path / "run" / "manifest.json").symbols) == {"EE", "JQK", "XP"}
    # Everything arrived; only the latency check failed.
    assert r["ledger_ok"] and r["missing"] == 0 and r["ticks_read"] == r["ticks_expected"] > 0
    assert not r["ok"] and not r["slo_ok"]
    failed = [c["name"] for c in r["slo"] if not c["ok"]]
    assert failed == ["latency p99"], r["slo"]
    assert r["latency_p99_s"] > 0.0001
    assert "SLOs FAIL: latency p99" in p.stderr


def _result(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "run_id": "x", "scenario": "full-day", "policy": "tickscale", "ok": True,
        "ledger_ok": True, "slo_ok": True, "missing": 0, "duplicated": 0, "reordered": 0,
        "latency_p50_s": 0.2, "latency_p99_s": 0.9, "lag_p99_s": 1.5,
        "handler_seconds": 400.0, "fixed_peak_handler_seconds": 1000.0,
    }  # fmt: skip
    base.update(kw)
    return base


def test_compare_two_runs_side_by_side(tmp_path: Path) -> None:
    a, b = tmp_path / "ours.json", tmp_path / "fixed.json"
    a.write_bytes(orjson.dumps(_result()))
    fixed = _result(
        policy="fixed:4", handler_seconds=1000.0, latency_p99_s=0.45, missing=3, ledger_ok=False
    )
    b.write_bytes(orjson.dumps(fixed))
    p = subprocess.run(
        [sys.executable, "-m", "tickscale", "loadtest", "compare", str(a), str(b)],
        capture_output=True, text=True, timeout=60, env=os.environ | {"COLUMNS": "200"},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:5]]
            for ln in p.stdout.splitlines() if ln.count("│") >= 5}  # fmt: skip
    assert rows["policy"] == ["tickscale", "fixed:4", "differs"]
    assert rows["handler-seconds"] == ["400", "1,000", "x2.50 worse"]
    assert rows["latency p99 (s)"] == ["0.900", "0.450", "x0.50 better"]
    assert rows["ticks missing"] == ["0", "3", "from 0"]
    assert rows["ledger"] == ["pass", "FAIL", "differs"]

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    p = subprocess.run(
        [sys.executable, "-m", "tickscale", "loadtest", "compare", str(a), str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 2 and "not a load-test result" in p.stderr
    # Each input a user must fix is one line naming the file, exit 2.
    cut = tmp_path / "cut.json"
    cut.write_text('{"ledger_ok": tr')
    for other, why in ((cut, "not JSON"), (tmp_path / "absent.json", "No such file")):
        p = subprocess.run(
            [sys.executable, "-m", "tickscale", "loadtest", "compare", str(a), str(other)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().splitlines() == [p.stderr.strip()], p.stderr
        assert p.stderr.startswith(f"error: {other}: {why}"), p.stderr


def test_flash_burst_plan_and_time_warp() -> None:
    plan = resolve("flash-burst", PlanOptions(speed="10", burst_multiple=4, burst_seconds=15))
    b = plan.burst
    assert b is not None
    # 15 wall seconds at 4 x 10: ten market minutes of the open, then ten more at 10x.
    assert (b.start_s, b.end_s) == (9 * 3600 + 30 * 60, 9 * 3600 + 40 * 60)
    assert (plan.start, plan.end) == ("09:25", "09:50:00")
    w = TimeWarp(b.start_s, b.end_s, b.multiple, "itch")
    ns = 1_000_000_000
    before, inside, after = 34_000 * ns, 34_500 * ns, 36_000 * ns
    assert w.warp(before) == before
    assert w.warp(inside) == 34_200 * ns + 300 * ns // 4
    assert w.warp(after) == after - 450 * ns  # 600 s compressed to 150 s
    for t in (before, inside, after):
        assert abs(w.unwarp(w.warp(t)) - t) < 10
    with pytest.raises(ValueError, match="--speed"):
        resolve("flash-burst", PlanOptions(speed="max"))
    with pytest.raises(ValueError, match="--scenario"):
        resolve("lunch")
    assert resolve("open", PlanOptions(only="AAPL,MSFT")).feed_args()[-2:] == [
        "--only",
        "AAPL,MSFT",
    ]
    with pytest.raises(ValueError, match="--only"):
        resolve("open", PlanOptions(only=" , "))


def test_chaos_specs() -> None:
    s = parse_chaos("redis-stop@30:45")
    assert (s.kind, s.at_s, s.duration_s) == ("redis-stop", 30.0, 45.0)
    assert parse_chaos("redis-stop@1m").duration_s == 60.0  # the default outage
    assert parse_chaos("kill-handler@+20s").at_s == 20.0
    for bad in ("kill-handler", "explode@3", "kill-handler@soon"):
        with pytest.raises(ValueError):
            parse_chaos(bad)


def test_histogram_percentiles_and_max() -> None:
    counts = [("0.1", 10), ("0.25", 50), ("0.5", 99), ("1.0", 100), ("30.0", 100), ("+Inf", 100)]
    text = "\n".join(
        f'tickscale_handler_e2e_latency_seconds_bucket{{le="{le}"}} {n}' for le, n in counts
    )
    h = Histogram.from_buckets(parse_buckets(text))
    assert h.count == 100
    assert h.quantile(0.5) == pytest.approx(0.25)
    assert h.quantile(0.99) == pytest.approx(0.5)
    assert h.max_bound() == 1.0
    # Above the last finite bucket nothing is known but "more": never the bound itself.
    slow = Histogram([1.0, 30.0, math.inf], [0, 0, 3])
    assert slow.quantile(0.5) == math.inf and slow.max_bound() == math.inf


def test_recovery_is_time_until_lag_stays_under_target() -> None:
    lags = [0, 0, 1, 4, 7, 9, 6, 3, 2, 8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    samples = [Sample(wall=100.0 + i, lag_s=float(v)) for i, v in enumerate(lags)]
    (r,) = recoveries(samples, [("kill", 101.0)], t_end=200.0, target_s=5.0, hold_s=5.0)
    # Under the target at +6 s, but above again at +8 s; settled from +9 s on.
    assert r.recovery_s == pytest.approx(9.0) and r.peak_lag_s == 9.0
    (never,) = recoveries(samples[:6], [("kill", 101.0)], t_end=106.0, target_s=5.0)
    assert never.recovery_s is None


@pytest.mark.slow
def test_sigterm_stops_the_run_and_everything_it_started(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    """A CI job's timeout sends SIGTERM: the run must stop its scaler and handlers, not
    leave them consuming."""
    out = tmp_path / "run"
    log = tmp_path / "loadtest.out"
    with log.open("wb") as f:
        p = subprocess.Popen(
            [sys.executable, "-m", "tickscale", "loadtest", "--no-progress",
             "--bootstrap", kafka_bootstrap, "--redis", redis_url, "--scenario", "open",
             "--from", "09:29", "--to", "10:30", "--speed", "1", "--symbols", "5",
             "--partitions", "2", "--policy", "fixed:1", "--out", str(out)],
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        logs = out / "scaler" / "logs"
        deadline = time.monotonic() + 120
        while not any("assigned" in q.read_text() for q in logs.glob("handler-*.log")):
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        assert p.wait(180) == 130, log.read_text()[-3000:]
        assert not holding(out), log.read_text()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
        for pid in holding(out):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_lag_above_target_counts_the_seconds_spent_above_it() -> None:
    lags = [0.5, 6.0, 8.0, 4.0, None, 7.0, 1.0]  # one sample a second
    samples = [Sample(wall=100.0 + i, lag_s=v) for i, v in enumerate(lags)]
    # Above 5 s from 101 to 103 and from 105 to 106; an unread lag counts as not above.
    assert lag_above(samples, 5.0) == 3.0
    assert lag_above(samples, 10.0) == 0.0
    assert lag_above(samples[:1], 0.0) == 0.0


def test_a_bootstrap_where_no_broker_answers_is_waited_for_then_named(tmp_path: Path) -> None:
    """--bootstrap given, nothing there: waited for (a stack still starting) up to
    --connect-timeout, then one line naming the flag, exit 2, and nothing left running
    (the Redis the run started for itself)."""
    from tickscale.localstack.net import free_port

    out = tmp_path / "run"
    where = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = loadtest("--bootstrap", where, "--connect-timeout", "3", "--out", str(out), timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: --bootstrap {where}: no broker answered within 3 s "
        "(is it running, is the address right?)"
    ], r.stderr[-3000:]
    assert f"no broker at {where} yet" in r.stderr and "Traceback" not in r.stderr
    assert took >= 3 and not holding(out), (took, r.stderr[-3000:])
