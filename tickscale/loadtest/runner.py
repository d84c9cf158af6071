"""One load-test run, start to verdict.

Order of events: services (started or reused) -> the run's own topics -> the scaler (process
backend) and its first handlers joined -> sampler -> the replay feed, with chaos drills at
their offsets from its first message -> the group drained -> the ledger -> the scaler stopped
(handlers drain) -> metrics, SLO checks, JSON, report. The measured window runs from the first
replayed message to the moment the group has no lag left after the last one.

A run fails fast (``RunError``, the reason in one line) when the replay feed exits with an
error, and when the group has had no members for ``no_members_s`` while records wait (see
``watch``): no drain is waited for that cannot happen.

Ctrl-C stops the feed, then the scaler (handlers first commit and leave), then the services
this run started; the run then counts as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.live import Live
from rich.table import Table

from scaler.lag import LagProbe
from scaler.settings import ScalerSettings
from tickscale.loadtest import chaos as chaos_mod
from tickscale.loadtest import ledger as ledger_mod
from tickscale.loadtest import results
from tickscale.loadtest.errors import RunError
from tickscale.loadtest.feedchild import feed_failure, read_feed, start_feed
from tickscale.loadtest.latency import Histogram
from tickscale.loadtest.liveview import LiveView
from tickscale.loadtest.outcome import build_result
from tickscale.loadtest.rollout_drill import RolloutPlan, rollout_line, start_rollout
from tickscale.loadtest.sampler import ReplayClock, Sampler
from tickscale.loadtest.scenarios import ReplayPlan
from tickscale.loadtest.settings import default
from tickscale.loadtest.slo import Thresholds
from tickscale.loadtest.stack import (
    RunNames,
    ScalerChild,
    Services,
    free_port_block,
    new_run_id,
    scaler_command,
)
from tickscale.loadtest.watch import NoMembers
from tickscale.localstack.net import free_port

log = logging.getLogger("tickscale.loadtest")


@dataclass(frozen=True)
class PolicySpec:
    """What ``--policy`` means for the scaler's command line."""

    name: str  # as given: tickscale | reactive | fixed:N
    scaler_policy: str
    min_handlers: int
    max_handlers: int
    calendar: str

    @property
    def fixed(self) -> bool:
        return self.name.startswith("fixed:")


def parse_policy(text: str, min_handlers: int, max_handlers: int) -> PolicySpec:
    """``tickscale``, ``reactive`` or ``fixed:N``; ValueError naming the option otherwise."""
    if text == "tickscale":
        return PolicySpec(text, "tickscale", min_handlers, max_handlers, "XNYS")
    if text == "reactive":
        # The baseline scales on lag alone; a calendar would only be ignored.
        return PolicySpec(text, "reactive", min_handlers, max_handlers, "none")
    if text.startswith("fixed:"):
        try:
            n = int(text.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--policy: fixed:N needs N >= 1, got {text!r}")
        # min = max = N with no calendar: the scaler only keeps N running (and replaces a
        # crashed one), which is what a fixed fleet under a supervisor does.
        return PolicySpec(text, "tickscale", n, n, "none")
    raise ValueError(f"--policy: expected tickscale, reactive or fixed:N, got {text!r}")


@dataclass
class LoadTestConfig:
    """One run, resolved; what is not given here is the command's declared default."""

    plan: ReplayPlan
    policy: PolicySpec
    target: str = default("target")
    bootstrap: str | None = None
    redis_url: str | None = None
    compose_env: Path = field(default_factory=lambda: default("compose_env"))
    partitions: int = default("partitions")
    session_min: str = default("session_min")
    lead_s: float = default("lead_s")
    lag_target_s: float = default("lag_target_s")
    scale_down_window_s: float = default("scale_down_window_s")
    chaos: list[chaos_mod.ChaosSpec] = field(default_factory=list)
    rollout: RolloutPlan | None = None  # --rollout VERSION@S (rollout_drill)
    thresholds: Thresholds = field(default_factory=Thresholds)
    out_dir: Path | None = None
    json_path: Path | None = None
    drain_timeout_s: float = default("drain_timeout_s")
    connect_timeout_s: float = default("connect_timeout_s")
    join_timeout_s: float = 120.0
    progress: bool = default("progress")
    keep_topics: bool = default("keep_topics")
    # Abort when the group is empty this long with lag (0: never).
    no_members_s: float = default("no_members_timeout_s")
    # Kafka and Redis provided by the caller (the reliability suite shares one pair across its
    # cases); the run may still drill them, but neither closes them nor deletes their data.
    services: Services | None = None


def _scaler_settings(cfg: LoadTestConfig, svc: Services, out: Path) -> ScalerSettings:
    """The run's scaler: the policy under test on the run's services, sessions by the
    replayed day's clock."""
    p = cfg.policy
    sessions: dict[str, Any] = {}
    if p.calendar != "none":
        sessions = {"clock": "replay", "session_min": cfg.session_min, "lead_s": cfg.lead_s}
    return ScalerSettings(
        backend="process", bootstrap=svc.bootstrap, redis_url=svc.redis_url,
        policy=p.scaler_policy, min_handlers=p.min_handlers, max_handlers=p.max_handlers,
        calendar=p.calendar, lag_target_s=cfg.lag_target_s,
        scale_down_window_s=cfg.scale_down_window_s, poll_s=1.0, metrics_port=free_port(),
        handler_base_port=free_port_block(p.max_handlers + 2), state_dir=str(out / "scaler"),
        **sessions,
    )  # fmt: skip


class LoadTest:
    def __init__(self, cfg: LoadTestConfig, console: Console) -> None:
        self.cfg = cfg
        self.console = console
        self.names = RunNames(new_run_id())
        self.out = cfg.out_dir or Path(".local/loadtest") / self.names.run_id
        self.clock = ReplayClock()
        self.services: Services | None = None
        self.scaler: ScalerChild | None = None
        self.sampler: Sampler | None = None
        self.feed: asyncio.subprocess.Process | None = None
        self.chaos_events: list[chaos_mod.ChaosEvent] = []
        self.view = LiveView(console, self.clock, lambda: self.sampler, NoMembers(cfg.no_members_s))
        self._chaos_task: asyncio.Task[list[chaos_mod.ChaosEvent]] | None = None
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    # --- the run -------------------------------------------------------------------------

    def run(self) -> tuple[int, dict[str, Any]]:
        cfg = self.cfg
        self.console.print(f"load test [bold]{self.names.run_id}[/]: output in {self.out}")
        borrowed = cfg.services is not None
        self.services = cfg.services or Services.open(
            cfg.target, cfg.bootstrap, cfg.redis_url, self.out / "services", cfg.compose_env
        )
        try:
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
            for note in self.services.notes if not borrowed else []:
                self.console.print(note)
            ctx = chaos_mod.ChaosContext(
                scaler=None,  # set once the scaler runs
                broker=self.services.broker if self.services.owns_broker else None,
                redis=self.services.redis,
                policy=cfg.policy.name,
                fleet=self.names.run_id,
            )
            try:
                chaos_mod.check_allowed(
                    cfg.chaos, ctx.broker is not None, ctx.redis is not None, cfg.policy.name
                )
            except ValueError as e:
                raise RunError(f"--chaos: {e}") from None
            result = asyncio.run(self._run(ctx))
        finally:
            if not borrowed:
                self.services.close()
        rc = 0 if result["ok"] else 1
        return rc, result

    async def _run(self, ctx: chaos_mod.ChaosContext) -> dict[str, Any]:
        cfg = self.cfg
        svc = self.services
        assert svc is not None
        # aiokafka logs every reconnect attempt at ERROR; outages are what the drills cause and
        # the run reports them itself, so only its critical messages are shown.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        from core.reach import BrokerUnreachable, reach
        from core.topology import create_topics

        n = self.names
        try:
            # A broker given by --bootstrap may still be starting (a stack brought up just
            # before the run): waited for like every command's, then named. Creating is
            # idempotent, so a retried attempt does no harm.
            await reach(
                svc.bootstrap, cfg.connect_timeout_s,
                lambda: create_topics(
                    svc.bootstrap, cfg.partitions, cfg.partitions,
                    raw=n.raw, ticks=n.ticks, deadletter=n.deadletter,
                ),
            )  # fmt: skip
        except BrokerUnreachable:
            raise
        except Exception as e:
            raise RunError(f"cannot create topics on {svc.bootstrap}: {e!r}") from e
        try:
            return await self._with_topics(ctx)
        finally:
            # A broker this run started goes with its data; any other keeps no run's topics.
            if not cfg.keep_topics and (cfg.services is not None or not svc.owns_broker):
                from tickscale.localstack import delete_topics

                with contextlib.suppress(Exception):
                    await delete_topics(svc.bootstrap, [n.raw, n.ticks, n.deadletter])

    async def _with_topics(self, ctx: chaos_mod.ChaosContext) -> dict[str, Any]:
        n, svc = self.names, self.services
        assert svc is not None
        self.scaler = ScalerChild(
            self._scaler_command(), os.environ.copy(), self.out / "logs" / "scaler.log"
        )
        ctx.scaler = self.scaler
        self.sampler = Sampler(
            LagProbe(svc.bootstrap, n.raw, n.group), svc.redis_url, n.audit_stream,
            self.out / "scaler" / "targets.json", self.clock, fleet=n.run_id,
        )  # fmt: skip
        sampling: asyncio.Task[None] | None = None
        try:
            await self.sampler.start()
            sampling = asyncio.create_task(self.sampler.run())
            await self._wait_fleet()
            return await self._replay_and_measure(ctx)
        finally:
            if self.feed is not None and self.feed.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.feed.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.feed.wait(), 30)
            self.sampler.stop()
            if sampling is not None:
                with contextlib.suppress(Exception):
                    await sampling
            await self.sampler.close()
            if self.scaler.alive():
                self.console.print("stopping the scaler (its handlers drain and commit)")
            self.scaler.stop()

    def _scaler_command(self) -> list[str]:
        assert self.services is not None
        return scaler_command(self.names, _scaler_settings(self.cfg, self.services, self.out))

    async def _wait_fleet(self) -> None:
        """Until the scaler's first handlers have joined: start-up is not part of the test."""
        assert self.scaler is not None and self.sampler is not None
        want = max(1, self.cfg.policy.min_handlers)
        self.console.print(f"scaler started (policy {self.cfg.policy.name}); waiting for "
                           f"{want} handler(s) to join")  # fmt: skip
        deadline = time.monotonic() + self.cfg.join_timeout_s
        while time.monotonic() < deadline:
            if not self.scaler.alive():
                raise RunError(f"the scaler exited:\n{self.scaler.tail()}")
            s = self.sampler.last
            if s is not None and self.cfg.policy.min_handlers == 0:
                return  # a fleet allowed to idle at zero has nothing to wait for
            if s is not None and (s.members or 0) >= want and s.group_state == "Stable":
                return
            await asyncio.sleep(0.5)
        raise RunError(f"no {want} handler(s) joined within {self.cfg.join_timeout_s:.0f}s:\n"
                       f"{self.scaler.tail()}")  # fmt: skip

    async def _replay_and_measure(self, ctx: chaos_mod.ChaosContext) -> dict[str, Any]:
        cfg = self.cfg
        assert self.sampler is not None
        sampler = self.sampler
        base_hist = sampler.latency.total()
        assert self.services is not None
        svc = self.services
        self.feed = await start_feed(
            self.cfg.plan, svc.bootstrap, self.names.raw, svc.redis_url, self.out
        )
        first = asyncio.Event()
        reader = asyncio.create_task(read_feed(self.feed, self.clock, first, self.console))
        live = Live(self.view.status(), console=self.console, refresh_per_second=2,
                    transient=False) if cfg.progress else None  # fmt: skip
        self._chaos_task = None
        rollout = start_rollout(cfg.rollout, svc.redis_url, self.names.run_id, first, self.clock)
        try:
            result = await self._replay(ctx, reader, first, live, base_hist)
            if rollout is not None:
                result["rollout"] = await rollout
                self.console.print(rollout_line(result["rollout"]))
                # The results were written before the rollout ended: again, with it.
                for path in (self.out / "results.json", cfg.json_path):
                    if path is not None:
                        results.write(path, result)
            return result
        finally:
            # An aborted run stops its drills too (a paused broker is resumed by its drill).
            for task in (self._chaos_task, reader, rollout):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _replay(
        self,
        ctx: chaos_mod.ChaosContext,
        reader: asyncio.Task[None],
        first: asyncio.Event,
        live: Live | None,
        base_hist: Histogram,
    ) -> dict[str, Any]:
        cfg = self.cfg
        assert self.sampler is not None and self.feed is not None
        sampler = self.sampler
        chaos_task: asyncio.Task[list[chaos_mod.ChaosEvent]] | None = None
        t0 = time.time()
        with live or contextlib.nullcontext():
            while not first.is_set() and self.feed.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(first.wait(), 0.5)
                self.view.tick(live)
            if first.is_set():
                t0 = self.clock.walls[0]
                if cfg.chaos:
                    chaos_task = self._chaos_task = asyncio.create_task(
                        chaos_mod.run_all(cfg.chaos, ctx, t0, self.view.on_chaos, self.chaos_events)
                    )
            while self.feed.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.feed.wait(), 1.0)
                self.view.tick(live)
            await reader
            rc = self.feed.returncode
            done = self.clock.done or {}
            if rc != 0 or not done:
                raise RunError(feed_failure(self.out, rc))
            if not done.get("msgs"):
                raise RunError(f"no messages between {cfg.plan.start} and {cfg.plan.end}")
            self.console.print(
                f"replay done: {done['records']:,} records in {done['elapsed_s']:.1f}s; "
                "waiting for the group to drain"
            )
            drained, t_end = await self._drain(live)
            if chaos_task is not None:
                self.chaos_events = await chaos_task
                last_fault = max((e.end_wall for e in self.chaos_events), default=t_end)
                if last_fault > t_end:
                    # A drill outlasted the drain: the run ends once the group has drained
                    # after the fault, so its recovery is measured too.
                    drained, t_end = await self._drain(live, after=last_fault)
        sampler.stop()
        await sampler.poll_audit()
        self.console.print("checking the ledger")
        led = await ledger_mod.check(
            self.services.bootstrap if self.services else "", self.names.ticks,
            self.names.deadletter, self.out / "manifest.json", timeout_s=60.0,
        )  # fmt: skip
        hist = sampler.latency.total() - base_hist
        return build_result(self, t0, t_end, drained, led, hist)

    async def _drain(self, live: Live | None, after: float = 0.0) -> tuple[bool, float]:
        """Until two samples after ``after`` in a row show no lag; (drained, when)."""
        assert self.sampler is not None
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        seen = 0
        last_wall = after
        while time.monotonic() < deadline:
            s = self.sampler.last
            if s is not None and s.wall > last_wall:
                last_wall = s.wall
                # Two readings in a row: one zero can be a committed offset read mid-rebalance.
                seen = seen + 1 if s.lag_msgs == 0 else 0
                if seen >= 2:
                    return True, s.wall
            await asyncio.sleep(0.5)
            self.view.tick(live)
        self.console.print(f"[red]the group did not drain within {self.cfg.drain_timeout_s:.0f}s")
        return False, time.time()


def print_summary(r: dict[str, Any], console: Console) -> None:
    t = Table(title=f"load test {r['run_id']}: {r['scenario']}, policy {r['policy']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("SLO")
    slo = {c["name"]: c for c in r["slo"]}

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.3f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    for label, key, check in (
        ("latency p50 (s)", "latency_p50_s", "latency p50"),
        ("latency p99 (s)", "latency_p99_s", "latency p99"),
        ("latency max, bucket bound (s)", "latency_max_s", "latency max"),
        ("lag p99 (s)", "lag_p99_s", "lag p99"),
        ("lag max (s)", "lag_max_s", "lag max"),
        ("recovery (s)", "recovery_s", "recovery"),
        ("peak rate (msg/s)", "peak_rate", None),
        ("duration (s)", "duration_s", None),
        ("handler-seconds (live processes)", "handler_seconds", None),
        ("member-seconds (group members)", "member_seconds", None),
        ("peak handlers", "peak_handlers", None),
        ("fixed peak-sized fleet (handler-s)", "fixed_peak_handler_seconds", None),
        ("handler-seconds / fixed fleet", "handler_seconds_ratio", None),
    ):
        c = slo.get(check or "")
        verdict = ""
        if c is not None:
            verdict = f"<= {c['threshold']:g}: " + ("[green]pass" if c["ok"] else "[red]FAIL")
        t.add_row(label, fmt(r.get(key)), verdict)
    console.print(t)
    for ev in r.get("chaos", []):
        console.print(f"chaos {ev['kind']} at +{ev['at_s']:g}s: {ev['detail']}")
    console.print(r["ledger_line"])
    failed = [c["name"] for c in r["slo"] if not c["ok"]]
    console.print(
        ("[green]SLOs PASS" if not failed else "[red]SLOs FAIL: " + ", ".join(failed))
        + f"; report {r.get('report')}"
    )
    console.print(("[green]PASS" if r["ok"] else "[red]FAIL") + f" {r['run_id']}")


def run_loadtest(cfg: LoadTestConfig, console: Console | None = None) -> tuple[int, dict[str, Any]]:
    """Run one load test; (exit status, results). RunError when it cannot be carried out."""
    con = console or Console(stderr=True)
    lt = LoadTest(cfg, con)
    rc, r = lt.run()
    print_summary(r, con)
    return rc, r


def dump(r: dict[str, Any]) -> str:
    return orjson.dumps(results.jsonable(r), option=orjson.OPT_INDENT_2).decode()
