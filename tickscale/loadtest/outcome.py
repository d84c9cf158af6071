"""What a load test run found: its result record, the report and the files beside it."""

from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import orjson

from core.sessions import CLOSE
from ingest.replay.source import parse_only
from tickscale.loadtest import ledger as ledger_mod
from tickscale.loadtest import results
from tickscale.loadtest.latency import Histogram
from tickscale.loadtest.report import market_midnight, write_report
from tickscale.loadtest.sampler import Sample
from tickscale.loadtest.slo import cost, evaluate, lag_above, lag_stats, recoveries, window

if TYPE_CHECKING:
    from tickscale.loadtest.runner import LoadTest


def disturbances(lt: LoadTest, t0: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    burst = lt.cfg.plan.burst
    if burst is not None and lt.clock.markets:
        end = market_midnight(lt.clock.markets[0]) + burst.end_s
        w = lt.clock.wall_at(end)
        if w is not None:
            out.append(("flash-burst end", w))
    events = lt.sampler.events if lt.sampler else []
    for ev in lt.chaos_events:
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


def build_result(
    lt: LoadTest, t0: float, t_end: float, drained: bool, led: ledger_mod.Ledger, hist: Histogram
) -> dict[str, Any]:
    cfg = lt.cfg
    assert lt.sampler is not None
    samples = window(lt.sampler.samples, t0, t_end)
    lag_p99, lag_max = lag_stats(samples)
    c = cost(lt.sampler.samples, t0, t_end)
    recs = recoveries(lt.sampler.samples, disturbances(lt, t0), t_end, cfg.lag_target_s)
    lat_max = hist.max_bound()
    done = lt.clock.done or {}
    rates = [s.ingest_rate for s in samples if s.ingest_rate is not None]
    r: dict[str, Any] = {
        **_identity(lt),
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
        "lag_above_target_s": round(lag_above(samples, cfg.lag_target_s), 1),
        "recovery_s": max((x.recovery_s for x in recs if x.recovery_s is not None), default=None),
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
        "replay": _replay_facts(lt),
        "lag_target_s": cfg.lag_target_s,
        "chaos": [e.as_dict() for e in lt.chaos_events],
        "ledger": led.as_dict(),
    }
    above = [k for k in ("latency_p50_s", "latency_p99_s", "latency_max_s") if r[k] == math.inf]
    if above:
        r["latency_max_note"] = (
            f"{', '.join(above)} above the handlers' last finite bucket (30 s): null in JSON"
        )
    r["scale_events"] = _scale_events(lt, t0)
    r["scale_event_count"] = len(r["scale_events"])
    checks = evaluate(cfg.thresholds, r, recs)
    r["slo"] = [ch.as_dict() for ch in checks]
    r["slo_ok"] = all(ch.ok for ch in checks)
    chaos_ok = all(e.ok for e in lt.chaos_events)
    r["chaos_ok"] = chaos_ok
    r["ok"] = bool(led.ok and r["slo_ok"] and drained and chaos_ok)
    write_outputs(lt, r, samples)
    return r


def _identity(lt: LoadTest) -> dict[str, Any]:
    """What was run: the scenario, its source and window, the policy and the target."""
    cfg, plan = lt.cfg, lt.cfg.plan
    return {
        "schema": results.SCHEMA,
        "run_id": lt.names.run_id,
        "started_at": lt.started_at,
        "scenario": plan.scenario,
        "policy": cfg.policy.name,
        "target": cfg.target,
        "source": plan.source,
        "symbols": plan.symbols if plan.source == "synthetic" else None,
        "only": sorted(parse_only(plan.only) or ()) or None,
        "seed": plan.seed,
        "date": (lt.clock.done or {}).get("date") or plan.date,
        "window": f"{plan.start}-{plan.end}",
        "speed": "max" if plan.speed is None else plan.speed,
        "partitions": cfg.partitions,
        "burst": None if plan.burst is None else asdict(plan.burst),
    }


def _replay_facts(lt: LoadTest) -> dict[str, Any]:
    """What the feed reported: messages, records, its own pace and drift."""
    done = lt.clock.done or {}
    market_span = (lt.clock.markets[-1] - lt.clock.markets[0]) if lt.clock.markets else 0
    wall_span = (lt.clock.walls[-1] - lt.clock.walls[0]) if lt.clock.walls else 0
    return {
        "messages": done.get("msgs"),
        "records": done.get("records"),
        "elapsed_s": round(float(done.get("elapsed_s", 0.0)), 2),
        "achieved_speed": round(market_span / wall_span, 2) if wall_span > 0 else None,
        "drift_p50_s": done.get("drift_p50_s"),
        "drift_p99_s": done.get("drift_p99_s"),
        "drift_max_s": done.get("drift_max_s"),
    }


def _scale_events(lt: LoadTest, t0: float) -> list[dict[str, Any]]:
    """The scaler's audit events, as the report lists them."""
    assert lt.sampler is not None
    return [
        {
            "time": e["time"], "offset_s": round(float(e["time"]) - t0, 1),
            "from": e["from"], "to": e["to"], "signal": e.get("signal"),
            "action": e.get("action"), "explanation": e.get("explanation"),
            "ok": (e.get("result") or {}).get("ok"),
        }
        for e in lt.sampler.events
    ]  # fmt: skip


def write_outputs(lt: LoadTest, r: dict[str, Any], samples: list[Sample]) -> None:
    assert lt.sampler is not None
    close = CLOSE
    manifest = lt.out / "manifest.json"
    with contextlib.suppress(OSError, ValueError):
        close = int(orjson.loads(manifest.read_bytes())["params"].get("close", CLOSE))
    # Charts cover the measured window: before the first message there is no market time.
    b = lt.cfg.plan.burst
    report = write_report(
        r, samples, lt.clock, lt.out, lt.cfg.lag_target_s, close,
        None if b is None else (b.start_s, b.end_s),
    )  # fmt: skip
    r["report"] = str(report)
    with (lt.out / "samples.csv").open("w", newline="") as f:
        w = csv.writer(f)
        cols = list(asdict(lt.sampler.samples[0]).keys()) if lt.sampler.samples else []
        w.writerow(["market", *cols])
        for s in lt.sampler.samples:
            m = lt.clock.market_at(s.wall)
            w.writerow([m, *asdict(s).values()])
    results.write(lt.out / "results.json", r)
    if lt.cfg.json_path is not None:
        results.write(lt.cfg.json_path, r)
