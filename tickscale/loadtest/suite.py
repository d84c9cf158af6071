"""``tickscale loadtest --suite reliability``: every drill and every bad input, one table.

Each case is one short load test (a compressed ``open``: four market minutes at 10x, a few
symbols, a fixed fleet of two) against one local Kafka and Redis that the suite starts and
shares across its cases (each run still has its own topics, group and scaler). A case is one
entry of ``CASES``: a name, what it does, how to run it and how to judge what happened::

    Case("broker-kill", "SIGKILL the broker, restart after 5 s", drill("broker-kill@6:5"))

``drill(...)`` and ``bad_input(...)`` build the common kinds; any callable taking the suite's
``Env`` and returning an ``Outcome`` can run a case, and any callable from an ``Outcome`` to a
list of problems (empty: pass) can judge one.

A drill passes when the ledger is exact (``missing=0 duplicated=0 reordered=0
checksum_mismatch=0``, every tick read), the group drained, every drill did what it says and
lag was back under the target within ``RECOVERY_LIMIT_S`` of each fault's end (the recovery
seconds in the table). A bad-input case passes when the ledger is exact, every bad record is
in the dead-letter topic as the manifest expects, and no good record was lost around them.

Results: ``<out>/suite.json`` (and ``--json PATH``), each case's own run directory (report,
logs, ``results.json``) under ``<out>/<case>/``.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from tickscale.loadtest import results
from tickscale.loadtest.chaos import ChaosSpec, parse_chaos
from tickscale.loadtest.runner import LoadTest, LoadTestConfig, RunError, parse_policy
from tickscale.loadtest.scenarios import PlanOptions, resolve
from tickscale.loadtest.slo import Thresholds
from tickscale.loadtest.stack import Services

SUITES = ("reliability",)
RECOVERY_LIMIT_S = 60.0
DAY = "2024-11-25"
WINDOW = ("09:29", "09:33")  # the open's first minutes, 24 wall seconds at 10x
SPEED = "10"
SYMBOLS = 12
LEDGER_KEYS = ("missing", "duplicated", "reordered", "checksum_mismatch")
LEDGER_COUNTS = ("ticks_read", "ticks_expected", "deadletters", "deadletters_expected")


@dataclass
class Outcome:
    """What a case's run produced: its results, or the one-line reason it stopped."""

    result: dict[str, Any] | None = None
    error: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # case-specific (e.g. clean ticks)
    out_dir: Path | None = None


@dataclass
class Env:
    """What a case runs on: the shared services, a work directory, the run's defaults."""

    services: Services
    out: Path
    progress: bool = False
    make_loadtest: Callable[[LoadTestConfig, Console], LoadTest] = LoadTest

    def config(self, case: str, **kw: Any) -> LoadTestConfig:
        """The compressed ``open`` run; keyword arguments override plan or config fields."""
        plan_kw: dict[str, Any] = {"start": WINDOW[0], "end": WINDOW[1], "speed": SPEED,
                                   "symbols": SYMBOLS, "seed": 3, "date": DAY}  # fmt: skip
        plan_kw |= {k: kw.pop(k) for k in list(kw) if k in _PLAN_KEYS}
        plan = resolve("open", PlanOptions(**plan_kw))
        base: dict[str, Any] = {
            "plan": plan,
            "policy": parse_policy("fixed:2", 1, 2),
            "partitions": 4,
            # Only recovery is a verdict here; latency and lag limits are the SLO runs' job.
            "thresholds": Thresholds(0, 0, 0, 0, 0, RECOVERY_LIMIT_S),
            "out_dir": self.out / case,
            "drain_timeout_s": 180.0,
            "progress": self.progress,
            "services": self.services,
        }
        return LoadTestConfig(**(base | kw))

    def run(self, cfg: LoadTestConfig) -> Outcome:
        """One load test, its console to ``console.log`` in its directory."""
        assert cfg.out_dir is not None
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        self.heal()
        with (cfg.out_dir / "console.log").open("w") as f:
            con = Console(file=f, width=120, force_terminal=False)
            try:
                _, r = self.make_loadtest(cfg, con).run()
            except (RunError, RuntimeError, TimeoutError, OSError) as e:
                con.print(f"error: {e}")
                return Outcome(error=str(e).splitlines()[0], out_dir=cfg.out_dir)
        return Outcome(result=r, out_dir=cfg.out_dir)

    def heal(self) -> None:
        """Services back up before a case: a case cut short may have left one down."""
        for svc in (self.services.broker, self.services.redis):
            if svc is not None:
                svc.start()


_PLAN_KEYS = {"source", "file", "symbols", "seed", "start", "end", "speed", "malformed_every"}

Runner = Callable[[Env, str], Outcome]
Judge = Callable[[Outcome], list[str]]


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    run: Runner
    judge: Judge = field(default_factory=lambda: judge_drill)


# --- judging -----------------------------------------------------------------------------


def ledger_problems(r: dict[str, Any]) -> list[str]:
    out = [f"{k}={r.get(k)}" for k in LEDGER_KEYS if r.get(k) != 0]
    if r.get("ticks_read") != r.get("ticks_expected"):
        out.append(f"ticks {r.get('ticks_read')}/{r.get('ticks_expected')}")
    if not r.get("ledger_ok"):
        out.append("ledger FAIL")
    return out


def judge_drill(o: Outcome) -> list[str]:
    if o.result is None:
        return [o.error or "no result"]
    r = o.result
    problems = ledger_problems(r)
    if not r.get("drained"):
        problems.append("the group did not drain")
    for ev in r.get("chaos", []):
        if not ev.get("ok"):
            problems.append(f"{ev['kind']}: {ev.get('detail')}")
    for rec in r.get("recoveries", []):
        s = rec.get("recovery_s")
        if s is None:
            problems.append(f"lag never back under target after {rec['label']}")
        elif s > RECOVERY_LIMIT_S:
            problems.append(f"{rec['label']}: recovery {s:.0f}s > {RECOVERY_LIMIT_S:.0f}s")
    return problems


def judge_bad_input(o: Outcome) -> list[str]:
    problems = judge_drill(o)
    r = o.result
    if r is None:
        return problems
    got, want = r.get("deadletters"), r.get("deadletters_expected")
    if not want:
        problems.append("no bad record reached the replay (nothing to dead-letter)")
    elif got != want:
        problems.append(f"deadletters {got}/{want}")
    bad = o.facts.get("bad_records")
    if bad is not None and want is not None:
        # Every bad record put in is a dead letter, and nothing else is.
        if (want != bad) if o.facts.get("exact") else (want < bad):
            problems.append(f"{want} dead letters expected for {bad} bad records in the file")
    clean = o.facts.get("clean_ticks")
    if clean is not None and r.get("ticks_expected") != clean:
        problems.append(
            f"good records lost around the bad ones: {r.get('ticks_expected')} ticks expected "
            f"from the file, {clean} in the same file without them"
        )
    return problems


def judge_scale_in(o: Outcome) -> list[str]:
    problems = judge_drill(o)
    if o.result is not None:
        ev = next((e for e in o.result.get("chaos", []) if e["kind"] == "scale-in"), None)
        if ev is None or "removed_at_s" not in ev.get("extra", {}):
            problems.append("the scaler removed no handler")
    return problems


# --- running -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DrillRun:
    """A compressed ``open`` run with these drills and config overrides."""

    specs: tuple[ChaosSpec, ...]
    overrides: dict[str, Any]

    def __call__(self, env: Env, name: str) -> Outcome:
        return env.run(env.config(name, chaos=list(self.specs), **self.overrides))


def drill(*specs: str, **overrides: Any) -> DrillRun:
    """``drill("broker-kill@6:5", "kill-handler@8")``: the ``--chaos`` specs of a case."""
    return DrillRun(tuple(parse_chaos(s) for s in specs), overrides)


@dataclass(frozen=True)
class BadFile:
    """An input file with bad records and the same file without them."""

    dirty: Path
    clean: Path
    source: str  # jsonl | itch
    bad: int  # bad records (lines, runs of garbage) put in
    exact: bool  # each is exactly one dead letter (else: at least one)


def bad_input(make: Callable[[Path], BadFile]) -> Runner:
    """A replay of the file ``make(dir)`` writes."""

    def run(env: Env, name: str) -> Outcome:
        d = env.out / name / "input"
        d.mkdir(parents=True, exist_ok=True)
        f = make(d)
        o = env.run(env.config(name, source=f.source, file=f.dirty))
        o.facts |= {"file": str(f.dirty), "bad_records": f.bad, "exact": f.exact,
                    "clean_ticks": expected_ticks(f.clean, f.source)}  # fmt: skip
        return o

    return run


def expected_ticks(path: Path, source: str) -> int:
    """Ticks the suite's window of ``path`` yields (the replay's own manifest arithmetic)."""
    from ingest.replay.spec import SourceSpec
    from tickscale.loadtest.feed import build_manifest

    spec = SourceSpec(
        source=source, symbols=SYMBOLS, seed=3, file=path, day=DAY, start=WINDOW[0], end=WINDOW[1]
    )
    src, _, day, _ = spec.build()
    m = build_manifest(list(src), day, "x", 4)
    return sum(s.ticks for s in m.symbols.values())


def jsonl_with_bad_lines(d: Path) -> BadFile:
    """A JSON-lines feed of the window, and a copy with an invalid line every 400."""
    from ingest.normalize import midnight_ns
    from ingest.replay.source import parse_hhmm

    rng = random.Random(7)
    base = midnight_ns(DAY)
    t0, t1 = parse_hhmm(WINDOW[0]), parse_hhmm(WINDOW[1])
    syms = [f"SYM{i}-USD" for i in range(SYMBOLS)]
    px = dict.fromkeys(syms, 100.0)
    good: list[bytes] = []
    ts = t0 * 1_000_000_000
    while ts < t1 * 1_000_000_000:
        ts += rng.randint(5, 35) * 1_000_000  # ~50 messages a market second
        s = rng.choice(syms)
        px[s] = max(1.0, px[s] + rng.choice((-0.01, 0.0, 0.01)))
        if rng.random() < 0.4:
            obj: dict[str, Any] = {"type": "trade", "symbol": s, "venue": "XTST", "ts": base + ts,
                                   "price": f"{px[s]:.2f}", "size": str(rng.randint(1, 9)),
                                   "side": rng.choice("BS"),
                                   "trade_id": str(len(good))}  # fmt: skip
        else:
            obj = {"type": "quote", "symbol": s, "venue": "XTST", "ts": base + ts,
                   "bid_px": f"{px[s] - 0.01:.2f}", "bid_sz": "1", "ask_px": f"{px[s] + 0.01:.2f}",
                   "ask_sz": "2"}  # fmt: skip
        good.append(orjson.dumps(obj))
    dirty: list[bytes] = []
    for i, line in enumerate(good):
        dirty.append(line)
        if i % 400 == 399:
            # Inside the window (a bad line's time is its neighbour's): the replay must send
            # it, not drop it as out of range.
            at = orjson.loads(line)["ts"]
            bad = [
                b"not json at all",
                b'{"type": "trade", "symbol": "SYM0-USD", "price": "-1"}',
                b'{"type": "quote", "symbol": "SYM1-USD", "ts": ',
                b'{"type": "bogus", "symbol": "SYM2-USD", "venue": "XTST", "ts": %d}' % at,
                # A time beyond 64 bits once stopped its partition for good.
                b'{"type": "trade", "symbol": "SYM3-USD", "venue": "XTST", "ts": %d, '
                b'"price": "1.00", "size": "1", "side": "B", "trade_id": "x"}' % (2**64 + at),
            ]
            dirty.append(bad[(i // 400) % len(bad)])
    clean_p, dirty_p = d / "clean.jsonl", d / "bad-lines.jsonl"
    clean_p.write_bytes(b"\n".join(good) + b"\n")
    dirty_p.write_bytes(b"\n".join(dirty) + b"\n")
    return BadFile(dirty_p, clean_p, "jsonl", len(dirty) - len(good), exact=True)


def itch_with_garbage(d: Path) -> BadFile:
    """A framed ITCH file of the synthetic day to the window's end, and a copy with runs of
    random bytes between frames inside the window."""
    from ingest.codecs import itch
    from ingest.replay.source import NS, parse_hhmm
    from ingest.replay.synthetic import SyntheticDay

    rng = random.Random(11)
    end_ns = parse_hhmm(WINDOW[1]) * NS
    first_garbage = (parse_hhmm(WINDOW[0]) + 60) * NS
    clean_p, dirty_p = d / "clean.itch", d / "garbage.itch"
    inserted = 0
    with clean_p.open("wb") as clean, dirty_p.open("wb") as dirty:
        for n, msg in enumerate(SyntheticDay(SYMBOLS, 3)):
            if msg.ts_ns >= end_ns:
                break
            framed = itch.frame(msg.payload)
            clean.write(framed)
            dirty.write(framed)
            if msg.ts_ns >= first_garbage and inserted < 3 and n % 997 == 0:
                dirty.write(rng.randbytes(rng.choice((7, 41, 300))))
                inserted += 1
    return BadFile(dirty_p, clean_p, "itch", inserted, exact=False)


def replay_bad_inputs(d: Path) -> list[tuple[str, str, list[str]]]:
    """Each input a user must fix: (what, a fragment its error line names, arguments)."""
    import gzip
    import itertools

    from ingest.codecs import itch
    from ingest.replay.synthetic import SyntheticDay

    frames = b"".join(itch.frame(m.payload) for m in itertools.islice(SyntheticDay(2, 3), 200))
    truncated = d / "truncated.itch"
    truncated.write_bytes(frames[:-5])
    cut_gz = d / "cut.itch.gz"
    cut_gz.write_bytes(gzip.compress(frames)[:-40])
    long_line = d / "long-line.jsonl"
    long_line.write_bytes(b'{"type": "trade", "note": "' + b"x" * (2 << 20) + b'"}\n')
    itch_args = ["--source", "itch", "--date", DAY]
    synthetic = ["--source", "synthetic", "--symbols", "2"]
    return [
        ("a truncated ITCH file", "@ byte", [*itch_args, "--file", str(truncated)]),
        ("a gzip ITCH file cut short", "gzip", [*itch_args, "--file", str(cut_gz)]),
        ("a 2 MiB JSON line", "line 1", ["--source", "jsonl", "--file", str(long_line)]),
        ("a directory as --file", "not a regular file", [*itch_args, "--file", str(d)]),
        ("--speed nan", "--speed", [*synthetic, "--speed", "nan"]),
        ("an unwritable --manifest", "manifest",
         [*synthetic, "--manifest", "/proc/tickscale/manifest.json"]),
        ("a topic that does not exist", "suite.absent.raw",
         [*synthetic, "--topic", "suite.absent.raw"]),
        ("an unreachable broker", "127.0.0.1:9",
         [*synthetic, "--bootstrap", "127.0.0.1:9", "--connect-timeout", "2"]),
    ]  # fmt: skip


def replay_input_run(env: Env, name: str) -> Outcome:
    """``tickscale replay`` given each bad input: what it exited with and printed."""
    import subprocess
    import sys

    d = env.out / name
    d.mkdir(parents=True, exist_ok=True)
    topic = f"suite-{int(time.time())}.raw"
    _create_topic(env.services.bootstrap, topic)
    checks = []
    for i, (what, names, args) in enumerate(replay_bad_inputs(d)):
        # (A later option, the bad input's own, wins over the same one here.)
        base = ["--bootstrap", env.services.bootstrap, "--topic", topic, "--speed", "max",
                "--manifest", str(d / f"manifest-{i}.json"), "--no-progress"]  # fmt: skip
        argv = [sys.executable, "-m", "tickscale", "replay", *base, *args]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
            code, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired:
            code, err = None, "still running after 120 s"
        lines = [ln for ln in err.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        checks.append({"input": what, "exit": code, "stderr": lines[-3:],
                       "traceback": "Traceback" in err, "error_lines": len(errors),
                       "names_it": any(names in ln for ln in errors)})  # fmt: skip
    return Outcome(facts={"checks": checks, "topic": topic}, out_dir=d)


def _create_topic(bootstrap: str, topic: str) -> None:
    import asyncio

    from tickscale.localstack.topics import ensure_topics

    asyncio.run(ensure_topics(bootstrap, {topic: 1}))


def judge_replay_input(o: Outcome) -> list[str]:
    checks = o.facts.get("checks")
    if not checks:
        return [o.error or "no input was tried"]
    return [
        f"{c['input']}: exit {c['exit']}, {c['error_lines']} error line(s)"
        + (", a traceback" if c["traceback"] else "")
        + ("" if c["names_it"] else ", the line does not name the input")
        for c in checks
        if c["exit"] != 2 or c["error_lines"] != 1 or c["traceback"] or not c["names_it"]
    ]


# fmt: off
CASES: list[Case] = [
    Case("kill-handler", "SIGKILL one handler", drill("kill-handler@6")),
    Case("kill-scaler", "SIGKILL the scaler, restart it after 10 s", drill("kill-scaler@6:10")),
    # Its removal waits for the policy's scale-down window and for 30 s after the fleet's
    # start: a shorter window and a longer replay let it happen under load.
    Case("scale-in", "the scaler removes a handler under load",
         drill("scale-in@6", scale_down_window_s=5.0, end="09:35"), judge_scale_in),
    # The outage users reported: about 40 s without a broker in the middle of the open.
    Case("broker-restart", "stop the broker, start it after 40 s", drill("broker-restart@6:40")),
    Case("broker-kill", "SIGKILL the broker, restart it after 5 s", drill("broker-kill@6:5")),
    Case("broker-pause", "SIGSTOP the broker for 10 s", drill("broker-pause@6:10")),
    Case("redis-stop", "stop Redis for 10 s", drill("redis-stop@6:10")),
    Case("redis-kill", "SIGKILL Redis, restart it after 10 s", drill("redis-kill@6:10")),
    Case("broker-kill+kill-handler", "SIGKILL the broker and, while it is down, a handler",
         drill("broker-kill@6:5", "kill-handler@8")),
    Case("kill-scaler+redis-kill", "SIGKILL the scaler and Redis together",
         drill("kill-scaler@6:10", "redis-kill@7:10")),
    Case("poison-records", "a malformed record after every 300 (three kinds)",
         drill(malformed_every=300), judge_bad_input),
    Case("jsonl-bad-lines", "a JSON-lines file with an invalid line every 400",
         bad_input(jsonl_with_bad_lines), judge_bad_input),
    Case("itch-garbage", "an ITCH file with runs of random bytes between frames",
         bad_input(itch_with_garbage), judge_bad_input),
    Case("replay-input", "tickscale replay given each input a user must fix",
         replay_input_run, judge_replay_input),
]
# fmt: on


# --- the suite -----------------------------------------------------------------------------


def select(cases: Sequence[Case], only: str | None) -> list[Case]:
    """The cases named in ``only`` (comma-separated), in the suite's order; ValueError names
    an unknown one."""
    if not only:
        return list(cases)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {c.name for c in cases}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(
            f"unknown case {', '.join(unknown) or repr(only)} (one of {', '.join(sorted(known))})"
        )
    return [c for c in cases if c.name in names]


def summarize(case: Case, o: Outcome, problems: list[str], elapsed_s: float) -> dict[str, Any]:
    r = o.result or {}
    recs = r.get("recoveries", [])
    worst = [x.get("recovery_s") for x in recs]
    return {
        "name": case.name,
        "what": case.what,
        "ok": not problems,
        "happened": happened(o),
        "problems": problems,
        "ledger": {k: r.get(k) for k in (*LEDGER_KEYS, *LEDGER_COUNTS)},
        "recovery_s": None if not recs or None in worst else max(worst),
        "recoveries": recs,
        "error": o.error,
        "facts": o.facts,
        "run_dir": None if o.out_dir is None else str(o.out_dir),
        "elapsed_s": round(elapsed_s, 1),
    }


def happened(o: Outcome) -> str:
    checks = o.facts.get("checks")
    if o.result is None and checks:
        ok = sum(c["exit"] == 2 and c["error_lines"] == 1 and not c["traceback"] for c in checks)
        return f"{ok} of {len(checks)} inputs: one error line naming it, exit 2, no traceback"
    if o.result is None:
        return f"stopped: {o.error}"
    r = o.result
    parts = [ev.get("detail", "") if ev.get("ok") else f"{ev['kind']} {ev.get('detail')}"
             for ev in r.get("chaos", [])]  # fmt: skip
    if r.get("deadletters_expected"):
        parts.append(
            f"{r.get('deadletters')}/{r['deadletters_expected']} bad records dead-lettered"
        )
    parts.append("drained" if r.get("drained") else "did not drain")
    return "; ".join(p for p in parts if p)


def ledger_cell(row: dict[str, Any]) -> str:
    led = row["ledger"]
    if led.get("missing") is None:
        return "-"
    ticks = f"ticks={led['ticks_read']:,}/{led['ticks_expected']:,}"
    return "\n".join([ticks, *(f"{k}={led[k]}" for k in LEDGER_KEYS)])


def recovery_cell(row: dict[str, Any]) -> str:
    if not row["recoveries"]:
        return "-"
    if row["recovery_s"] is None:
        return "never"
    return f"{row['recovery_s']:.1f}"


def table(rows: Sequence[dict[str, Any]], title: str) -> Table:
    t = Table(title=title, show_lines=True)
    t.add_column("case", no_wrap=True)
    t.add_column("what happened")
    t.add_column("ledger")
    t.add_column("recovery s", justify="right")
    t.add_column("verdict")
    for row in rows:
        verdict = "[green]PASS" if row["ok"] else "[red]FAIL[/]: " + "; ".join(row["problems"])
        t.add_row(row["name"], row["happened"], ledger_cell(row), recovery_cell(row), verdict)
    return t


def run_suite(
    name: str,
    cases: Sequence[Case],
    out: Path,
    console: Console,
    json_path: Path | None = None,
    services: Services | None = None,
    env_kw: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Run ``cases`` in order on one Kafka and Redis (started here unless ``services``).

    Returns (exit status: 0 when every case passed, else 1; the suite's JSON).
    """
    started = time.time()
    own = services is None
    console.print(f"suite [bold]{name}[/]: {len(cases)} case(s); output in {out}")
    svc = services or Services.open("local", None, None, out / "services", Path("compose/.env"))
    rows: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"schema": results.SCHEMA, "suite": name, "ok": False, "cases": rows,
                           "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    try:
        env = Env(svc, out, **(env_kw or {}))
        for case in cases:
            t0 = time.monotonic()
            console.print(f"case [bold]{case.name}[/]: {case.what}")
            try:
                o = case.run(env, case.name)
            except (RunError, RuntimeError, TimeoutError, OSError, ValueError) as e:
                # The case's own set-up (its input files) failed: a finding, not a crash.
                o = Outcome(error=f"{type(e).__name__}: {e}".splitlines()[0])
            problems = case.judge(o)
            row = summarize(case, o, problems, time.monotonic() - t0)
            rows.append(row)
            verdict = "[green]PASS" if row["ok"] else "[red]FAIL: " + "; ".join(problems)
            console.print(f"  {verdict}[/] ({row['elapsed_s']:.0f}s)")
    finally:
        if own:
            svc.close()
        doc["ok"] = bool(rows) and len(rows) == len(cases) and all(r["ok"] for r in rows)
        doc["elapsed_s"] = round(time.time() - started, 1)
        console.print(table(rows, f"suite {name}: {sum(r['ok'] for r in rows)}/{len(cases)} pass"))
        for path in (out / "suite.json", json_path):
            if path is not None:
                with contextlib.suppress(OSError):
                    results.write(path, doc)
    return (0 if doc["ok"] else 1), doc


def cases_of(name: str) -> list[Case]:
    if name != "reliability":
        raise ValueError(f"unknown suite {name!r} (one of {', '.join(SUITES)})")
    return CASES
