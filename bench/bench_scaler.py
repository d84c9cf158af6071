"""Scaler reaction time, live, and the policy backtest, each beside the reactive baseline.

One command: ``.venv/bin/python -m bench.bench_scaler [--backend docker|process]``
(starts its own broker and Redis; the docker backend needs the engine and the
``tickscale:dev`` image, see ``.ci/docker.sh``).

Live, per policy (ours, then the KEDA+HPA model), on a fresh topic and group:

1. one handler idles; then a load step: a synthetic open replayed as fast as
   the broker takes it;
2. scale-up reaction: step start (the first record of the load at the broker,
   not the feed process's launch) -> the scaler's first added handler is a
   member of the group and the group is consuming again (Stable, committed
   offsets advancing);
3. scale-down reaction: lag drained -> the scaler's first removal.

Offline (``scaler.simulate``): a whole synthetic day through both policies:
handler-seconds, seconds above the lag target, peak lag at the open.

Rebalances (``bench/rebalance.py``): real handler processes on 24 partitions, added
and stopped one at a time; per event the whole group's pause, a moved partition's
longest stall and, for a new handler, join -> consuming (goal 2 s).

Goals (from the project's issue): a new handler consuming within 10 s of the
step with the docker backend; with pre-scaling, lag at the synthetic open
under the target; handler-seconds within 110% of the baseline's while
lag-above-target seconds fall by at least 80%.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError

from bench import rebalance
from bench.results import write_result
from core.topology import create_topics
from scaler.calendar import SessionCalendar
from scaler.lag import LagProbe
from scaler.signals import Snapshot
from scaler.simulate import HandlerModel, backtest, synthetic_day
from tickscale.localstack import KafkaBroker, RedisServer
from tickscale.localstack.net import free_port

DAY = dt.date(2024, 11, 25)


@dataclass
class Reaction:
    policy: str
    up_s: float | None  # step -> added handler consuming
    drained_s: float | None  # step -> lag back to 0
    down_s: float | None  # drained -> first removal
    peak_lag: int
    feed_start_s: float  # feed launch -> its first record at the broker (not in up_s)


def scaler_cmd(args: argparse.Namespace, bootstrap: str, redis_url: str, topic: str,
               group: str, policy: str, work: Path) -> list[str]:  # fmt: skip
    cmd = [
        sys.executable, "-m", "tickscale", "scaler", "--backend", args.backend,
        "--policy", policy, "--bootstrap", bootstrap, "--redis-url", redis_url,
        "--topic", topic, "--group", group, "--min-handlers", "1", "--max-handlers", "4",
        "--calendar", "none", "--lag-target", "5", "--poll", "1",
        "--scale-down-window", str(args.down_window), "--name", f"bench-{policy}-{os.getpid()}",
        "--metrics-port", str(free_port()), "--handler-base-port", str(free_port()),
        "--state-dir", str(work / f"scaler-{policy}"), "--stop-grace", "30",
    ]  # fmt: skip
    if args.backend in ("docker", "swarm"):
        cmd += ["--network", "host", "--image", args.image]
    return cmd


async def _idle(probe: LagProbe, policy: str, log_name: str) -> Snapshot:
    """Idle: the first handler joined and the group settled."""
    deadline = time.monotonic() + 120
    while True:
        s = await measure(probe)
        if s.members >= 1 and s.group_state == "Stable":
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{policy}: no handler joined; see {log_name}")
        await asyncio.sleep(0.5)
    await asyncio.sleep(5)
    return s


async def _first_record(probe: LagProbe, rp: subprocess.Popen[bytes], ends0: int) -> float:
    """When the first record of the load reached the broker (monotonic): the poll before
    the first new offsets, so the figure errs long."""
    t_step = before = time.monotonic()
    while rp.poll() is None:
        s = await measure(probe)
        if sum(p.end_offset for p in s.partitions) > ends0:
            return before
        before = time.monotonic()
        await asyncio.sleep(0.05)
    return t_step


async def _watch(
    args: argparse.Namespace,
    probe: LagProbe,
    rp: subprocess.Popen[bytes],
    policy: str,
    t_step: float,
    members0: int,
) -> tuple[float | None, float | None, float | None, int]:
    """After the step: (scale-up, drained, scale-down) seconds and the peak lag in messages."""
    up_s: float | None = None
    drained_s: float | None = None
    down_s: float | None = None
    peak = 0
    last_committed = None
    max_members = members0
    seen: tuple[int, str, bool] | None = None
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        s = await measure(probe)
        now = time.monotonic()
        peak = max(peak, s.lag_msgs)
        committed = sum(p.end_offset - p.lag for p in s.partitions)
        consuming = last_committed is not None and committed > last_committed
        last_committed = committed
        max_members = max(max_members, s.members)
        if args.timeline and (s.members, s.group_state, consuming) != seen:
            seen = (s.members, s.group_state, consuming)
            print(f"  {policy} +{now - t_step:6.2f}s {wall()} members={s.members} "
                  f"state={s.group_state} consuming={consuming} lag={s.lag_msgs}")  # fmt: skip
        if up_s is None and s.members > members0 and s.group_state == "Stable" and consuming:
            up_s = now - t_step
        if drained_s is None and rp.poll() is not None and s.lag_msgs == 0:
            drained_s = now - t_step
        if drained_s is not None and down_s is None and s.members < max_members:
            down_s = now - t_step - drained_s
            break
        await asyncio.sleep(0.25)
    return up_s, drained_s, down_s, peak


async def step(args: argparse.Namespace, bootstrap: str, redis_url: str, policy: str,
               work: Path) -> Reaction:  # fmt: skip
    suffix = f"{policy}-{int(time.time())}"
    raw, ticks, dl = f"b.raw.{suffix}", f"b.ticks.{suffix}", f"b.dl.{suffix}"
    group = f"b.group.{suffix}"
    await create_topics(bootstrap, args.partitions, args.partitions, raw=raw, ticks=ticks,
                        deadletter=dl)  # fmt: skip
    env = os.environ | {
        "TICKSCALE_SCALER_OUT_TOPIC": ticks, "TICKSCALE_SCALER_DEADLETTER_TOPIC": dl,
        # Containers and services outlive a scaler unless it removes them; a run's own
        # fleet name keeps the next run from adopting handlers of a broker that is gone.
        "TICKSCALE_SCALER_STOP_HANDLERS_ON_EXIT": "true",
    }  # fmt: skip
    log = (work / f"scaler-{policy}.log").open("wb")
    sc = subprocess.Popen(
        scaler_cmd(args, bootstrap, redis_url, raw, group, policy, work),
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    probe = LagProbe(bootstrap, raw, group)
    await probe.start()
    try:
        s = await _idle(probe, policy, log.name)
        ends0 = sum(p.end_offset for p in s.partitions)
        t_launch = time.monotonic()
        rp = subprocess.Popen(
            [sys.executable, "-m", "tickscale", "replay", "--bootstrap", bootstrap,
             "--topic", raw, "--manifest", str(work / f"m-{policy}.json"), "--no-progress",
             "--symbols", str(args.symbols), "--from", "09:29", "--to", args.step_end,
             "--speed", "max"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # The step is the first record of the load reaching the broker, not the feed
        # process's launch: the replay spends its first seconds starting and
        # generating the day, and the scaler cannot react to load not yet sent.
        t_step = await _first_record(probe, rp, ends0)
        if args.timeline:
            print(f"  {policy}: first load record {t_step - t_launch:.2f}s after the feed's launch "
                  f"({wall()})")  # fmt: skip
        up_s, drained_s, down_s, peak = await _watch(args, probe, rp, policy, t_step, s.members)
        rp.wait(60)
        return Reaction(policy, up_s, drained_s, down_s, peak, t_step - t_launch)
    finally:
        await probe.stop()
        sc.terminate()
        try:
            sc.wait(120)
        except subprocess.TimeoutExpired:
            sc.kill()
        log.close()


async def measure(probe: LagProbe) -> Snapshot:
    """One probe reading, retried through a fresh broker's coordinator election."""
    for _ in range(60):
        try:
            return await probe.measure()
        except KafkaError:
            await asyncio.sleep(0.5)
    return await probe.measure()


def wall() -> str:
    """Wall-clock time with milliseconds, to line the timeline up with the scaler's log."""
    return dt.datetime.now().strftime("%H:%M:%S.%f")[:-3]


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:6.1f} s"


def offline(args: argparse.Namespace) -> dict[str, float]:
    cal = SessionCalendar("XNYS")
    series = synthetic_day(DAY, symbols=args.sim_symbols, seed=args.seed)
    ours, reactive = backtest(series, cal, HandlerModel(), lag_target_s=5.0, keep_series=True)

    def open_peak(r: object) -> float:
        t0 = 9 * 3600 + 30 * 60
        return max(
            (lag for t, lag in zip(r.times, r.lag_s, strict=True)  # type: ignore[attr-defined]
             if t0 - 60 <= t < t0 + 300), default=0.0,
        )  # fmt: skip

    print(f"\nbacktest: {series.source}, {DAY}, 04:00-20:00, lag target 5 s")
    print(f"{'':28}{'tickscale':>14}{'reactive':>14}{'ratio':>10}")
    for key in ("handler_seconds", "lag_above_target_s", "peak_lag_s", "scale_events"):
        a, b = getattr(ours, key), getattr(reactive, key)
        print(f"{key:28}{a:14,.1f}{b:14,.1f}{a / b if b else float('nan'):10.2f}")
    op_a, op_b = open_peak(ours), open_peak(reactive)
    print(f"{'peak lag 09:29-09:35 (s)':28}{op_a:14.1f}{op_b:14.1f}")
    hs = ours.handler_seconds / reactive.handler_seconds
    cut = 1 - ours.lag_above_target_s / max(reactive.lag_above_target_s, 1)
    print(f"goal handler-seconds <= 110% of baseline: {hs:.0%} "
          f"[{'met' if hs <= 1.1 else 'NOT met'}]; lag-above-target cut >= 80%: {cut:.0%} "
          f"[{'met' if cut >= 0.8 else 'NOT met'}]; open lag < 5 s: "
          f"[{'met' if op_a < 5 else 'NOT met'}]")  # fmt: skip
    figures = {f"backtest_{k}_{p}": float(getattr(r, k))
               for k in ("handler_seconds", "lag_above_target_s", "peak_lag_s", "scale_events")
               for p, r in (("tickscale", ours), ("reactive", reactive))}  # fmt: skip
    return {**figures, "backtest_open_peak_lag_s_tickscale": round(op_a, 2),
            "backtest_open_peak_lag_s_reactive": round(op_b, 2)}  # fmt: skip


def record(args: argparse.Namespace, sim: dict[str, float], live: list[Reaction],
           rebalances: dict[str, Any] | None = None) -> None:  # fmt: skip
    """The run's result file: the backtest's figures and ratios, each live step's and the
    rebalances'."""
    figures: dict[str, float | None] = {k: round(v, 2) for k, v in sim.items()}
    ratios: dict[str, float | None] = {}
    for key in ("handler_seconds", "lag_above_target_s", "peak_lag_s", "scale_events"):
        base = sim[f"backtest_{key}_reactive"]
        ours = sim[f"backtest_{key}_tickscale"]
        ratios[f"backtest_{key}"] = round(ours / base, 3) if base else None
    for r in live:
        figures[f"live_up_s_{r.policy}"] = None if r.up_s is None else round(r.up_s, 2)
        figures[f"live_down_s_{r.policy}"] = None if r.down_s is None else round(r.down_s, 2)
    if rebalances is not None:
        events = rebalances["events"]
        figures["rebalance_pause_max_s"] = max(e["pause_s"] for e in events)
        figures["rebalance_moved_stall_max_s"] = max(e["stall_s"] for e in events)
        figures["rebalance_join_to_consume_max_s"] = rebalances["join_to_consume_worst_s"]
        figures["rebalance_steady_gap_s"] = rebalances["steady_gap_s"]
    extra: dict[str, Any] = {
        "backend": None if args.offline_only else args.backend,
        "params": vars(args),
        "rebalances": rebalances,
    }
    print(f"result: {write_result('scaler', figures, ratios, extra)}")


async def main(args: argparse.Namespace) -> int:
    sim = offline(args)
    if args.offline_only:
        record(args, sim, [])
        return 0
    work = Path(tempfile.mkdtemp(prefix="tickscale-bench-scaler-"))
    broker = KafkaBroker(work / "kafka").start()
    redis = RedisServer(work_dir=work / "redis").start()
    try:
        rebalances = None
        if not args.no_rebalances:
            rebalances = await asyncio.to_thread(
                rebalance.run, broker.bootstrap, redis.url, work / "rebalances",
                args.rebalance_partitions,
            )  # fmt: skip
        results = []
        for policy in [p for p in args.policies.split(",") if p]:
            r = await step(args, broker.bootstrap, redis.url, policy, work)
            results.append(r)
        print(f"\nlive load step ({args.backend} backend, {args.partitions} partitions, "
              f"synthetic open 09:29-{args.step_end} at max speed)")  # fmt: skip
        print(f"{'':34}{'up: step->consuming':>22}{'drained':>12}{'down: drained->removal':>26}"
              f"{'peak lag':>12}{'feed start':>12}")  # fmt: skip
        for r in results:
            print(f"{r.policy:34}{fmt(r.up_s):>22}{fmt(r.drained_s):>12}{fmt(r.down_s):>26}"
                  f"{r.peak_lag:>12,}{fmt(r.feed_start_s):>12}")  # fmt: skip
        print("(step = the load's first record at the broker; feed start = the replay process's "
              "launch to that record, not counted in 'up')")  # fmt: skip
        ours = next((r for r in results if r.policy == "tickscale"), None)
        if args.backend == "docker" and ours is not None:
            ok = ours.up_s is not None and ours.up_s <= 10
            print(
                f"goal new handler consuming within 10 s (docker): [{'met' if ok else 'NOT met'}]"
            )
        record(args, sim, results, rebalances)
        print(f"logs: {work}")
        return 0
    finally:
        redis.stop()
        broker.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="process", choices=["process", "docker", "swarm"])
    ap.add_argument("--image", default="tickscale:dev")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--symbols", type=int, default=40)
    ap.add_argument("--step-end", default="10:00")
    ap.add_argument("--down-window", type=float, default=30.0, help="our scale-down window")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--sim-symbols", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--offline-only", action="store_true")
    ap.add_argument(
        "--policies", default="tickscale,reactive", help="live steps to run, comma-separated"
    )
    ap.add_argument("--no-rebalances", action="store_true", help="skip the rebalance events")
    ap.add_argument("--rebalance-partitions", type=int, default=24)
    ap.add_argument(
        "--timeline", action="store_true", help="print each change of the group during a step"
    )
    sys.exit(asyncio.run(main(ap.parse_args())))
