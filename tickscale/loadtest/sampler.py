"""One sample a second of what a run does: lag, rates, handlers, latency, the replay's clock.

- lag (messages and seconds) and the group's membership come from the broker
  (``scaler.lag.LagProbe``), the same measurement the scaler acts on;
- rates are the per-second deltas of the summed end offsets (into ``md.raw``) and committed
  offsets (processed by the group), unsmoothed so bursts show as they were;
- handlers: the run's handler processes alive right now, found in ``/proc`` by their handler
  id (``procs.handler_pids``); that count is what the fleet costs, starting handlers included,
  and is what handler-seconds integrate. Not the scaler's ``targets.json``: a scaler killed
  without a shutdown leaves its last list behind, naming handlers that have exited;
- members: the group's members as the broker reports them (member-seconds integrate these);
- latency: every handler in the scaler's ``targets.json`` (their metrics endpoints) scraped for
  its e2e histogram (``latency``), merged over the run;
- scale events: the scaler's audit stream in Redis, read every few seconds and kept here, so
  a Redis restart (which empties it) loses none.

A sample whose broker reading failed (broker down in a drill) keeps ``lag_s`` None: the gap is
visible in the charts rather than filled in.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from scaler.audit import read_events
from scaler.lag import LagProbe
from tickscale.loadtest.counters import FleetCounter
from tickscale.loadtest.latency import FleetLatency, Histogram, http_get, parse_buckets
from tickscale.loadtest.procs import handler_pids

log = logging.getLogger(__name__)

LATENCY_WINDOW_S = 5.0  # window of the latency-over-time series (per-second is too sparse)


@dataclass
class Sample:
    wall: float
    lag_s: float | None = None
    lag_msgs: int | None = None
    ingest_rate: float | None = None
    process_rate: float | None = None
    members: int | None = None
    group_state: str = ""
    handlers: int = 0  # live handler processes of the run
    lat_p50: float | None = None
    lat_p99: float | None = None
    replay_msgs: int = 0
    ticks: int = 0  # published by the fleet so far, as its handlers report
    deadletters: int = 0


@dataclass
class ReplayClock:
    """(wall, market) points reported by the feed; maps wall time to the replayed day's time."""

    walls: list[float] = field(default_factory=list)
    markets: list[float] = field(default_factory=list)
    msgs: int = 0
    records: int = 0
    done: dict[str, Any] | None = None

    def add(self, wall: float, market: float) -> None:
        if self.walls and wall <= self.walls[-1]:
            return
        self.walls.append(wall)
        self.markets.append(market)

    @property
    def started(self) -> float | None:
        return self.walls[0] if self.walls else None

    def speed(self) -> float:
        """Average market seconds per wall second over the replay so far (1 when unknown)."""
        if len(self.walls) < 2 or self.walls[-1] <= self.walls[0]:
            return 1.0
        return max(1e-9, (self.markets[-1] - self.markets[0]) / (self.walls[-1] - self.walls[0]))

    def market_at(self, wall: float) -> float | None:
        """Market time at ``wall``; outside the replay it runs on at the average speed, so the
        drain after the last message stays visible on a market-time axis."""
        if not self.walls:
            return None
        if wall <= self.walls[0]:
            return self.markets[0] - (self.walls[0] - wall) * self.speed()
        if wall >= self.walls[-1]:
            return self.markets[-1] + (wall - self.walls[-1]) * self.speed()
        i = bisect.bisect_right(self.walls, wall)
        w0, w1 = self.walls[i - 1], self.walls[i]
        m0, m1 = self.markets[i - 1], self.markets[i]
        return m0 + (m1 - m0) * (wall - w0) / max(w1 - w0, 1e-9)

    def wall_at(self, market: float) -> float | None:
        """First wall time the replay reached ``market`` (None if it never did)."""
        i = bisect.bisect_left(self.markets, market)
        return self.walls[i] if i < len(self.walls) else None


def read_targets(path: Path) -> list[tuple[str, str]]:
    """(handler name, host:port) of the live handlers in a process backend's targets file."""
    try:
        groups = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    out = []
    for g in groups:
        name = g.get("labels", {}).get("container", "")
        for t in g.get("targets", []):
            out.append((name or t, t))
    return out


class Sampler:
    """One sample a second of the run: lag from ``probe`` (the scaler's own measure), scale
    events from the audit stream, handlers from the targets file, latency and counts from
    the handlers' metrics."""

    def __init__(
        self,
        probe: LagProbe,
        redis_url: str,
        audit_stream: str,
        targets_file: Path,
        clock: ReplayClock,
        fleet: str,
        period_s: float = 1.0,
    ) -> None:
        self.fleet = fleet
        self.probe = probe
        self.redis_url = redis_url
        self.audit_stream = audit_stream
        self.targets_file = targets_file
        self.clock = clock
        self.period_s = period_s
        self.samples: list[Sample] = []
        self.latency = FleetLatency()
        self.ticks = FleetCounter("tickscale_handler_ticks_out")
        self.deadletters = FleetCounter("tickscale_handler_deadletters")
        self.events: list[dict[str, Any]] = []
        self._event_keys: set[tuple[Any, ...]] = set()
        self._lat_hist: list[tuple[float, Histogram]] = []
        self._last_offsets: tuple[float, int, int] | None = None
        self._stop = asyncio.Event()
        self._redis: Redis | None = None

    async def start(self) -> None:
        await self.probe.start()
        self._redis = Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)

    async def close(self) -> None:
        await self.probe.stop()
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.aclose()

    def stop(self) -> None:
        self._stop.set()

    @property
    def last(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    async def run(self) -> None:
        n = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            await self.sample_once()
            n += 1
            if n % 3 == 0:
                await self.poll_audit()
            delay = max(0.0, self.period_s - (time.monotonic() - t0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
        await self.poll_audit()

    async def sample_once(self) -> Sample:
        s = Sample(wall=time.time(), replay_msgs=self.clock.msgs)
        targets = read_targets(self.targets_file)
        s.handlers = len(handler_pids(self.fleet))
        measure = asyncio.ensure_future(asyncio.wait_for(self.probe.measure(), 5.0))
        await asyncio.gather(*(self._scrape(name, addr) for name, addr in targets))
        try:
            snap = await measure
        except (KafkaError, OSError, TimeoutError) as e:
            log.debug("lag probe failed: %r", e)
        else:
            s.wall = snap.time
            s.lag_s, s.lag_msgs = snap.lag_s, snap.lag_msgs
            s.members, s.group_state = snap.members, snap.group_state
            ends = sum(p.end_offset for p in snap.partitions)
            done = sum(p.end_offset - p.lag for p in snap.partitions)
            if self._last_offsets is not None:
                t0, e0, d0 = self._last_offsets
                dt = snap.time - t0
                if dt > 0:
                    s.ingest_rate = max(0, ends - e0) / dt
                    s.process_rate = max(0, done - d0) / dt
            self._last_offsets = (snap.time, ends, done)
        total = self.latency.total()
        self._lat_hist.append((s.wall, total))
        while len(self._lat_hist) > 2 and self._lat_hist[1][0] <= s.wall - LATENCY_WINDOW_S:
            self._lat_hist.pop(0)
        window = total - self._lat_hist[0][1]
        s.lat_p50, s.lat_p99 = window.quantile(0.5), window.quantile(0.99)
        s.ticks, s.deadletters = self.ticks.total, self.deadletters.total
        self.samples.append(s)
        return s

    async def _scrape(self, name: str, addr: str) -> None:
        host, _, port = addr.rpartition(":")
        try:
            text = await http_get(host, int(port), "/metrics")
        except (OSError, TimeoutError, ValueError):
            return  # starting, stopping or killed: its last scrape stands
        self.ticks.update(name, text)
        self.deadletters.update(name, text)
        buckets = parse_buckets(text)
        if buckets:
            self.latency.update(name, Histogram.from_buckets(buckets))

    async def poll_audit(self) -> None:
        if self._redis is None:
            return
        try:
            events = await read_events(self._redis, self.audit_stream, count=100_000)
        except (RedisError, OSError) as err:
            log.debug("audit stream unreadable: %r", err)
            return
        for ev in events:
            key = (ev.get("time"), ev.get("scaler"), ev.get("from"), ev.get("to"))
            if key not in self._event_keys:
                self._event_keys.add(key)
                self.events.append(ev)
        self.events.sort(key=lambda ev: float(ev.get("time", 0.0)))
