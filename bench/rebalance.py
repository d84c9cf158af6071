"""What one handler joining or leaving costs the group, with real handlers.

Real handler processes (``tickscale handler``, exactly-once, Redis snapshots) consume
a steady replayed feed. Handlers are added one at a time, then stopped one at a time
(SIGTERM: each commits and snapshots its partitions as it gives them up). An observer
samples the group's committed offsets and its assignment every ``SAMPLE_S`` through
librdkafka's admin client, and per event reports:

- pause: the longest stretch in which no partition of the group committed, the whole
  group's stop (the steady state's own longest stretch is printed beside it);
- moved partitions and the longest stall among them: the longest stretch in which a
  partition that changed owner committed nothing (the restore and the revocation's
  commit are in it);
- for an added handler, join -> consuming: from its first appearance as a group
  member to the first commit of a partition it was given (goal: 2 s), and from its
  process's start.

Figures are in multiples of the sampling interval: a stretch shorter than it reads as
one interval.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka.admin import AdminClient

from core.topology import create_topics
from tickscale.localstack.net import free_port

SAMPLE_S = 0.05
WINDOW_S = 15.0  # observed after each event
JOIN_GOAL_S = 2.0


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # monotonic
    committed: dict[int, int]  # partition -> committed offset
    owners: dict[int, str]  # partition -> the owner's client id (its handler id)
    members: frozenset[str]


@dataclass
class Observer:
    """Samples the group in a thread of its own, so the bench's waits do not skew it."""

    bootstrap: str
    group: str
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Observer:
        self._admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        self._thread = threading.Thread(target=self._run, name="rebalance-observer", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        # Released here, in the caller's thread: librdkafka's client torn down at
        # interpreter exit crashed the process once.
        del self._admin

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.samples.append(self._sample())
            except Exception:  # a coordinator moving or loading: the next sample
                pass
            self._stop.wait(max(0.0, SAMPLE_S - (time.monotonic() - t0)))

    def _sample(self) -> Sample:
        desc = self._admin.describe_consumer_groups([self.group])[self.group].result(5)
        members = frozenset(m.client_id for m in desc.members)
        if not members:
            # Two runs that asked for the offsets before the group had a member ended
            # in a segmentation fault; asking only once it has one, none has.
            return Sample(time.monotonic(), {}, {}, members)
        owners = {
            tp.partition: m.client_id
            for m in desc.members
            for tp in (m.assignment.topic_partitions if m.assignment else [])
        }
        req = [ConsumerGroupTopicPartitions(self.group)]
        offsets = self._admin.list_consumer_group_offsets(req)[self.group].result(5)
        committed = {tp.partition: tp.offset for tp in offsets.topic_partitions if tp.offset >= 0}
        return Sample(time.monotonic(), committed, owners, members)

    def since(self, t: float) -> list[Sample]:
        return [s for s in list(self.samples) if s.t >= t]

    def last_before(self, t: float) -> Sample | None:
        before = [s for s in list(self.samples) if s.t < t]
        return before[-1] if before else None


def longest_gap(samples: list[Sample], partitions: set[int] | None, t0: float, t1: float) -> float:
    """The longest stretch of [t0, t1] in which none of ``partitions`` (None: any) committed;
    the window ends at its last sample, when sampling stopped before ``t1``."""
    last, longest, end = t0, 0.0, t0
    prev: dict[int, int] | None = None
    for s in samples:
        if s.t < t0:
            prev = s.committed  # what the first sample in the window is compared with
            continue
        if s.t > t1:
            break
        end = s.t
        if prev is not None:
            moved = [p for p, o in s.committed.items() if o > prev.get(p, o)]
            if any(partitions is None or p in partitions for p in moved):
                longest = max(longest, s.t - last)
                last = s.t
        prev = s.committed
    return max(longest, end - last) if end > t0 else t1 - t0


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "join" or "leave"
    handler: str
    pause_s: float
    moved: int
    stall_s: float
    join_to_consume_s: float | None = None
    start_to_consume_s: float | None = None


def judge(obs: Observer, kind: str, handler: str, t_event: float) -> Event:
    """An event's figures, from the samples of its window."""
    t_end = t_event + WINDOW_S
    window = obs.since(t_event - 1.0)
    before = obs.last_before(t_event)
    after = window[-1] if window else None
    owners0 = before.owners if before else {}
    owners1 = after.owners if after else {}
    moved = {p for p in owners1 if owners0.get(p) != owners1.get(p)}
    moved |= {p for p in owners0 if p not in owners1}
    pause = longest_gap(window, None, t_event, t_end)
    stall = max((longest_gap(window, {p}, t_event, t_end) for p in moved), default=0.0)
    if kind != "join":
        return Event(kind, handler, pause, len(moved), stall)
    joined = next((s.t for s in window if handler in s.members), None)
    consumed = _first_commit_of(window, handler)
    return Event(
        kind, handler, pause, len(moved), stall,
        None if joined is None or consumed is None else consumed - joined,
        None if consumed is None else consumed - t_event,
    )  # fmt: skip


def _first_commit_of(samples: list[Sample], handler: str) -> float | None:
    """When a partition owned by ``handler`` first committed past where it was given."""
    start: dict[int, int] = {}
    for s in samples:
        for p, owner in s.owners.items():
            if owner != handler:
                continue
            if p not in start:
                start[p] = s.committed.get(p, -1)
            elif s.committed.get(p, -1) > start[p]:
                return s.t
    return None


@dataclass
class Fleet:
    """Handler processes, each its own ``tickscale handler``."""

    env: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def add(self, name: str) -> float:
        env = self.env | {
            "TICKSCALE_HANDLER_HANDLER_ID": name,
            "TICKSCALE_HANDLER_METRICS_HOST": "127.0.0.1",
            "TICKSCALE_HANDLER_METRICS_PORT": str(free_port()),
        }
        log = (self.logs / f"{name}.log").open("wb")
        t = time.monotonic()
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "tickscale", "handler"], env=env, stdout=log, stderr=log
        )
        log.close()
        return t

    def stop(self, name: str, timeout: float = 60.0) -> float:
        p = self.procs.pop(name)
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
        return t

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name, 30)


def handler_env(bootstrap: str, redis_url: str, topics: dict[str, str]) -> dict[str, str]:
    return os.environ | {
        "TICKSCALE_HANDLER_BOOTSTRAP": bootstrap,
        "TICKSCALE_HANDLER_IN_TOPIC": topics["raw"],
        "TICKSCALE_HANDLER_OUT_TOPIC": topics["ticks"],
        "TICKSCALE_HANDLER_DEADLETTER_TOPIC": topics["deadletter"],
        "TICKSCALE_HANDLER_GROUP": topics["group"],
        "TICKSCALE_HANDLER_REDIS_URL": redis_url,
    }


def wait_for(
    obs: Observer, what: str, ok: Callable[[Sample], bool], timeout: float = 120.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if obs.samples and ok(obs.samples[-1]):
            return
        time.sleep(SAMPLE_S)
    raise RuntimeError(f"rebalance bench: {what} did not happen within {timeout:.0f} s")


def run_events(
    obs: Observer, fleet: Fleet, start: int, peak: int
) -> tuple[tuple[float, float], list[Event]]:
    """``start`` handlers settle; then one joins at a time up to ``peak``, and they leave
    again one at a time. Returns the steady state's longest gaps (the group's, one
    partition's) and the events."""
    for i in range(start):
        fleet.add(f"rb-h{i}")
    wait_for(
        obs,
        f"{start} handlers holding every partition",
        lambda s: len(s.members) == start and len(set(s.owners.values())) == start,
    )
    # The feed takes its first seconds to start: events count only once every
    # partition has something committed.
    wait_for(
        obs,
        "a commit on every partition",
        lambda s: (
            bool(s.owners) and len(s.committed) == len(s.owners) and min(s.committed.values()) > 0
        ),
    )
    time.sleep(5)
    t = time.monotonic()
    time.sleep(WINDOW_S)
    quiet = obs.since(t - 1.0)
    parts = set(quiet[-1].committed) if quiet else set()
    steady = (
        longest_gap(quiet, None, t, t + WINDOW_S),
        max((longest_gap(quiet, {p}, t, t + WINDOW_S) for p in parts), default=0.0),
    )
    events = []
    for i in range(start, peak):
        name = f"rb-h{i}"
        t_event = fleet.add(name)
        time.sleep(WINDOW_S)
        events.append(judge(obs, "join", name, t_event))
    for i in reversed(range(start, peak)):
        name = f"rb-h{i}"
        t_event = fleet.stop(name)
        time.sleep(max(0.0, WINDOW_S - (time.monotonic() - t_event)))
        events.append(judge(obs, "leave", name, t_event))
    return steady, events


def report(steady: tuple[float, float], events: list[Event]) -> dict[str, Any]:
    """Print the table; the figures for the bench's result file."""
    print(f"\nrebalances with real handlers (sampled every {SAMPLE_S * 1000:.0f} ms; steady "
          f"state's longest commit gap: group {steady[0]:.2f} s, one partition "
          f"{steady[1]:.2f} s)")  # fmt: skip
    print(f"{'event':22}{'group pause':>13}{'moved':>7}{'moved: longest stall':>22}"
          f"{'join->consuming':>17}{'start->consuming':>18}")  # fmt: skip
    for e in events:
        jc = "-" if e.join_to_consume_s is None else f"{e.join_to_consume_s:.2f} s"
        sc = "-" if e.start_to_consume_s is None else f"{e.start_to_consume_s:.2f} s"
        print(f"{e.kind + ' ' + e.handler:22}{e.pause_s:>11.2f} s{e.moved:>7}"
              f"{e.stall_s:>20.2f} s{jc:>17}{sc:>18}")  # fmt: skip
    joins = [e.join_to_consume_s for e in events if e.kind == "join"]
    worst = None if not joins or None in joins else max(j for j in joins if j is not None)
    ok = worst is not None and worst <= JOIN_GOAL_S
    print(
        f"goal a new handler consuming within {JOIN_GOAL_S:.0f} s of joining: "
        f"[{'met' if ok else 'NOT met'}]" + ("" if worst is None else f" (worst {worst:.2f} s)")
    )
    return {
        "steady_gap_s": round(steady[0], 3),
        "steady_partition_gap_s": round(steady[1], 3),
        "events": [_event_dict(e) for e in events],
        "join_to_consume_worst_s": None if worst is None else round(worst, 3),
    }


def _event_dict(e: Event) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in Event.__slots__:
        v = getattr(e, k)
        out[k] = round(v, 3) if isinstance(v, float) else v
    return out


def run(bootstrap: str, redis_url: str, work: Path, partitions: int = 24, start: int = 2,
        peak: int = 4, symbols: int = 100, speed: int = 20) -> dict[str, Any]:  # fmt: skip
    """The whole measurement on fresh topics and group: feed, handlers, events, report."""
    work.mkdir(parents=True, exist_ok=True)
    suffix = str(int(time.time()))
    topics = {"raw": f"rb.raw.{suffix}", "ticks": f"rb.ticks.{suffix}",
              "deadletter": f"rb.dl.{suffix}", "group": f"rb.group.{suffix}"}  # fmt: skip
    asyncio.run(create_topics(bootstrap, partitions, partitions, raw=topics["raw"],
                              ticks=topics["ticks"], deadletter=topics["deadletter"]))  # fmt: skip
    feed = subprocess.Popen(
        [sys.executable, "-m", "tickscale", "replay", "--bootstrap", bootstrap,
         "--topic", topics["raw"], "--manifest", str(work / f"rb-{suffix}.json"),
         "--no-progress", "--symbols", str(symbols), "--from", "11:00", "--to", "16:00",
         "--speed", str(speed)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    fleet = Fleet(handler_env(bootstrap, redis_url, topics), work)
    try:
        with Observer(bootstrap, topics["group"]) as obs:
            steady, events = run_events(obs, fleet, start, peak)
    finally:
        fleet.close()
        feed.terminate()
        feed.wait(60)
    print(f"({partitions} partitions, a replayed midday at {symbols} symbols x {speed} speed, "
          f"{start} to {peak} handlers; logs in {work})")  # fmt: skip
    return report(steady, events)
