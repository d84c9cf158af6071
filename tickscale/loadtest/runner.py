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
import csv
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.live import Live
from rich.table import Table

from core.sessions import CLOSE, session_at
from ingest.replay.source import parse_only
from tickscale.loadtest import chaos as chaos_mod
from tickscale.loadtest import ledger as ledger_mod
from tickscale.loadtest import results
from tickscale.loadtest.latency import Histogram
from tickscale.loadtest.report import market_midnight, write_report
from tickscale.loadtest.sampler import ReplayClock, Sample, Sampler
from tickscale.loadtest.scenarios import ReplayPlan, hhmmss
from tickscale.loadtest.slo import Thresholds, cost, evaluate, lag_stats, recoveries, window
from tickscale.loadtest.stack import (
    RunNames,
    ScalerChild,
    Services,
    free_port_block,
    new_run_id,
    scaler_command,
    scaler_env,
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
    plan: ReplayPlan
    policy: PolicySpec
    target: str = "local"
    bootstrap: str | None = None
    redis_url: str | None = None
    compose_env: Path = Path("compose/.env")
    partitions: int = 6
    session_min: str = "open=4,close=3"
    lead_s: float = 5.0
    lag_target_s: float = 5.0
    scale_down_window_s: float = 30.0
    chaos: list[chaos_mod.ChaosSpec] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    out_dir: Path | None = None
    json_path: Path | None = None
    drain_timeout_s: float = 300.0
    join_timeout_s: float = 120.0
    progress: bool = True
    keep_topics: bool = False
    no_members_s: float = 30.0  # abort when the group is empty this long with lag (0: never)
    # Kafka and Redis provided by the caller (the reliability suite shares one pair across its
    # cases); the run may still drill them, but neither closes them nor deletes their data.
    services: Services | None = None


class RunError(RuntimeError):
    """The run could not be carried out (as opposed to: it ran and failed its checks)."""


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
        self._printed_events = 0
        self.no_members = NoMembers(cfg.no_members_s)
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
        from core.topology import create_topics

        n = self.names
        try:
            await create_topics(
                svc.bootstrap, cfg.partitions, cfg.partitions,
                raw=n.raw, ticks=n.ticks, deadletter=n.deadletter,
            )  # fmt: skip
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
            self._scaler_command(), scaler_env(n), self.out / "logs" / "scaler.log"
        )
        ctx.scaler = self.scaler
        self.sampler = Sampler(
            svc.bootstrap, n.raw, n.group, svc.redis_url, n.audit_stream,
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
        cfg, n, svc = self.cfg, self.names, self.services
        assert svc is not None
        p = cfg.policy
        return scaler_command(
            names=n, bootstrap=svc.bootstrap, redis_url=svc.redis_url, policy=p.scaler_policy,
            min_handlers=p.min_handlers, max_handlers=p.max_handlers, calendar=p.calendar,
            session_min=cfg.session_min, lead_s=cfg.lead_s, lag_target_s=cfg.lag_target_s,
            scale_down_window_s=cfg.scale_down_window_s, metrics_port=free_port(),
            handler_base_port=free_port_block(p.max_handlers + 2),
            state_dir=self.out / "scaler",
        )  # fmt: skip

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

    async def _start_feed(self) -> asyncio.subprocess.Process:
        cfg, n, svc = self.cfg, self.names, self.services
        assert svc is not None
        cmd = [
            sys.executable, "-m", "tickscale.loadtest.feed", "--bootstrap", svc.bootstrap,
            "--topic", n.raw, "--manifest", str(self.out / "manifest.json"),
            "--redis", svc.redis_url, *cfg.plan.feed_args(),
        ]  # fmt: skip
        log_f = (self.out / "logs" / "replay.log").open("ab")
        try:
            return await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=log_f,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        finally:
            log_f.close()

    async def _read_feed(self, proc: asyncio.subprocess.Process, first: asyncio.Event) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            try:
                d = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if d.get("event") == "done":
                self.clock.done = d
                continue
            if d.get("event") == "prepared":
                self.console.print(f"replay prepared: {d['msgs']:,} messages; publishing")
                continue
            self.clock.add(float(d["wall"]), float(d["market"]))
            self.clock.msgs, self.clock.records = int(d["msgs"]), int(d["records"])
            first.set()

    async def _replay_and_measure(self, ctx: chaos_mod.ChaosContext) -> dict[str, Any]:
        cfg = self.cfg
        assert self.sampler is not None
        sampler = self.sampler
        base_hist = sampler.latency.total()
        self.feed = await self._start_feed()
        first = asyncio.Event()
        reader = asyncio.create_task(self._read_feed(self.feed, first))
        live = Live(self._status(), console=self.console, refresh_per_second=2,
                    transient=False) if cfg.progress else None  # fmt: skip
        self._chaos_task = None
        try:
            return await self._replay(ctx, reader, first, live, base_hist)
        finally:
            # An aborted run stops its drills too (a paused broker is resumed by its drill).
            for task in (self._chaos_task, reader):
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
                self._tick(live)
            if first.is_set():
                t0 = self.clock.walls[0]
                if cfg.chaos:
                    chaos_task = self._chaos_task = asyncio.create_task(
                        chaos_mod.run_all(cfg.chaos, ctx, t0, self._on_chaos, self.chaos_events)
                    )
            while self.feed.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.feed.wait(), 1.0)
                self._tick(live)
            await reader
            rc = self.feed.returncode
            done = self.clock.done or {}
            if rc != 0 or not done:
                raise RunError(self._feed_failure(rc))
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
        return self._result(t0, t_end, drained, led, hist)

    def _feed_failure(self, rc: int | None) -> str:
        """Why the feed failed: its own ``error:`` line (bad input) or where its log is."""
        log_path = self.out / "logs" / "replay.log"
        try:
            lines = log_path.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        said = [ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")]
        if said:
            return f"the replay refused its input (exit {rc}): {said[-1]}"
        return f"the replay feed failed (exit {rc}); see {log_path}"

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
            self._tick(live)
        self.console.print(f"[red]the group did not drain within {self.cfg.drain_timeout_s:.0f}s")
        return False, time.time()

    # --- live view -----------------------------------------------------------------------

    def _on_chaos(self, ev: chaos_mod.ChaosEvent) -> None:
        style = "yellow" if ev.ok else "red"
        self.console.print(f"[{style}]chaos {ev.kind} at +{ev.at_s:g}s: {ev.detail}")

    def _tick(self, live: Live | None) -> None:
        assert self.sampler is not None
        last = self.sampler.last
        if last is not None:
            reason = self.no_members.observe(last)
            if reason is not None:
                raise RunError(reason)
        evs = self.sampler.events
        for e in evs[self._printed_events :]:
            self.console.print(f"[cyan]scale {e.get('from')} -> {e.get('to')} ({e.get('signal')})")
        self._printed_events = len(evs)
        if live is not None:
            live.update(self._status())

    def _status(self) -> Table:
        s = self.sampler.last if self.sampler else None
        t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        for col in ("market", "session", "replayed", "in/s", "out/s", "lag s", "lag msgs",
                    "handlers", "ticks", "dead letters", "p99 s"):  # fmt: skip
            t.add_column(col, justify="right")
        m = self.clock.market_at(time.time()) if self.clock.walls else None
        clock = "-" if m is None else hhmmss(m - market_midnight(m))
        session = "-" if m is None else session_at(m - market_midnight(m)).value

        def f(v: float | int | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        if s is None:
            t.add_row(clock, session, f"{self.clock.msgs:,}", *["-"] * 8)
        else:
            t.add_row(
                clock, session, f"{self.clock.msgs:,}", f(s.ingest_rate, ",.0f"),
                f(s.process_rate, ",.0f"), f(s.lag_s, ".1f"), f(s.lag_msgs, ","),
                str(s.handlers), f"{s.ticks:,}", f"{s.deadletters:,}", f(s.lat_p99, ".3f"),
            )  # fmt: skip
        return t

    # --- results -------------------------------------------------------------------------

    def _disturbances(self, t0: float) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        burst = self.cfg.plan.burst
        if burst is not None and self.clock.markets:
            end = market_midnight(self.clock.markets[0]) + burst.end_s
            w = self.clock.wall_at(end)
            if w is not None:
                out.append(("flash-burst end", w))
        events = self.sampler.events if self.sampler else []
        for ev in self.chaos_events:
            if not ev.ok:
                continue
            # Recovery counts from the fault's end (the service back, the scaler restarted);
            # a kill's end is its start.
            t = ev.end_wall or ev.wall
            label = f"{ev.kind} end" if ev.duration_s else ev.kind
            if ev.kind == "scale-in":
                downs = [e for e in events if e["to"] < e["from"] and float(e["time"]) >= ev.wall]
                if downs:
                    t = float(downs[0]["time"])
                    ev.extra["removed_at_s"] = round(t - t0, 1)
                    ev.detail += f"; removed at +{t - t0:.1f}s"
                    label = "scale-in (removal)"
                else:
                    ev.detail += "; no removal before the end of the run"
            out.append((f"{label} at +{t - t0:.0f}s", t))
        return sorted(out, key=lambda d: d[1])

    def _result(
        self, t0: float, t_end: float, drained: bool, led: ledger_mod.Ledger, hist: Histogram
    ) -> dict[str, Any]:
        cfg = self.cfg
        assert self.sampler is not None
        samples = window(self.sampler.samples, t0, t_end)
        lag_p99, lag_max = lag_stats(samples)
        c = cost(self.sampler.samples, t0, t_end)
        recs = recoveries(self.sampler.samples, self._disturbances(t0), t_end, cfg.lag_target_s)
        lat_max = hist.max_bound()
        done = self.clock.done or {}
        rates = [s.ingest_rate for s in samples if s.ingest_rate is not None]
        market_span = (self.clock.markets[-1] - self.clock.markets[0]) if self.clock.markets else 0
        wall_span = (self.clock.walls[-1] - self.clock.walls[0]) if self.clock.walls else 0
        plan = cfg.plan
        r: dict[str, Any] = {
            "schema": results.SCHEMA,
            "run_id": self.names.run_id,
            "started_at": self.started_at,
            "scenario": plan.scenario,
            "policy": cfg.policy.name,
            "target": cfg.target,
            "source": plan.source,
            "symbols": plan.symbols if plan.source == "synthetic" else None,
            "only": sorted(parse_only(plan.only) or ()) or None,
            "seed": plan.seed,
            "date": (self.clock.done or {}).get("date") or plan.date,
            "window": f"{plan.start}-{plan.end}",
            "speed": "max" if plan.speed is None else plan.speed,
            "partitions": cfg.partitions,
            "burst": None if plan.burst is None else asdict(plan.burst),
            "drained": drained,
            "ledger_ok": led.ok,
            "ledger_line": led.line(),
            **{k: v for k, v in led.as_dict().items() if k not in ("ledger_ok", "problems")},
            "latency_p50_s": hist.quantile(0.5),
            "latency_p99_s": hist.quantile(0.99),
            "latency_max_s": lat_max,
            "latency_observations": hist.count,
            "lag_p99_s": lag_p99,
            "lag_max_s": lag_max,
            "recovery_s": max(
                (x.recovery_s for x in recs if x.recovery_s is not None), default=None
            ),
            "recoveries": [x.as_dict() for x in recs],
            "duration_s": round(c.duration_s, 3),
            "handler_seconds": round(c.handler_seconds, 1),
            "handler_seconds_source": "live handler processes of the run (/proc)",
            "member_seconds": round(c.member_seconds, 1),
            "peak_handlers": c.peak_handlers,
            "fixed_peak_handler_seconds": round(c.fixed_peak_handler_seconds, 1),
            "handler_seconds_ratio": None if c.ratio is None else round(c.ratio, 4),
            "peak_rate": max(rates) if rates else None,
            "replay_records": done.get("records"),
            "replay": {
                "messages": done.get("msgs"),
                "records": done.get("records"),
                "elapsed_s": round(float(done.get("elapsed_s", 0.0)), 2),
                "achieved_speed": round(market_span / wall_span, 2) if wall_span > 0 else None,
                "drift_p50_s": done.get("drift_p50_s"),
                "drift_p99_s": done.get("drift_p99_s"),
                "drift_max_s": done.get("drift_max_s"),
            },
            "lag_target_s": cfg.lag_target_s,
            "chaos": [e.as_dict() for e in self.chaos_events],
            "ledger": led.as_dict(),
        }
        above = [k for k in ("latency_p50_s", "latency_p99_s", "latency_max_s") if r[k] == math.inf]
        if above:
            r["latency_max_note"] = (
                f"{', '.join(above)} above the handlers' last finite bucket (30 s): null in JSON"
            )
        r["scale_events"] = [
            {
                "time": e["time"], "offset_s": round(float(e["time"]) - t0, 1),
                "from": e["from"], "to": e["to"], "signal": e.get("signal"),
                "action": e.get("action"), "explanation": e.get("explanation"),
                "ok": (e.get("result") or {}).get("ok"),
            }
            for e in self.sampler.events
        ]  # fmt: skip
        r["scale_event_count"] = len(r["scale_events"])
        checks = evaluate(cfg.thresholds, r, recs)
        r["slo"] = [ch.as_dict() for ch in checks]
        r["slo_ok"] = all(ch.ok for ch in checks)
        chaos_ok = all(e.ok for e in self.chaos_events)
        r["chaos_ok"] = chaos_ok
        r["ok"] = bool(led.ok and r["slo_ok"] and drained and chaos_ok)
        self._write(r, samples)
        return r

    def _write(self, r: dict[str, Any], samples: list[Sample]) -> None:
        assert self.sampler is not None
        close = CLOSE
        manifest = self.out / "manifest.json"
        with contextlib.suppress(OSError, ValueError):
            close = int(orjson.loads(manifest.read_bytes())["params"].get("close", CLOSE))
        # Charts cover the measured window: before the first message there is no market time.
        b = self.cfg.plan.burst
        report = write_report(
            r, samples, self.clock, self.out, self.cfg.lag_target_s, close,
            None if b is None else (b.start_s, b.end_s),
        )  # fmt: skip
        r["report"] = str(report)
        with (self.out / "samples.csv").open("w", newline="") as f:
            w = csv.writer(f)
            cols = list(asdict(self.sampler.samples[0]).keys()) if self.sampler.samples else []
            w.writerow(["market", *cols])
            for s in self.sampler.samples:
                m = self.clock.market_at(s.wall)
                w.writerow([m, *asdict(s).values()])
        results.write(self.out / "results.json", r)
        if self.cfg.json_path is not None:
            results.write(self.cfg.json_path, r)


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
