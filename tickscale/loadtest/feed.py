"""The load test's replay feed: the project's publisher with a speed profile, as a child process.

``python -m tickscale.loadtest.feed --bootstrap B --topic T --manifest M [plan options]``

It runs apart from the load test's sampler because publishing at tens of thousands of messages
a second keeps an interpreter busy, and sharing one would make both the feed and the
once-a-second samples late. The window's messages and the manifest are prepared before the
first message goes out (see ``run``). Sources, windows, malformed-message injection, the
publisher and the replay clock in Redis are the ones ``tickscale replay`` uses.

Progress goes to stdout as one JSON object per line (wall time, market time, messages), which
the parent turns into its live view and into the market-time axis of the charts.

Flash bursts: the publisher paces every message by its timestamp at one speed. Timestamps
inside the burst window are compressed by the burst multiple before the publisher sees them
(payloads keep their true times, so ticks and the manifest are unchanged), so that stretch goes
out ``multiple`` times faster. The clock published to Redis and reported to the parent is
un-compressed again: the scaler's calendar and the charts see true market time.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from core.runtime import freeze_startup_heap
from core.topology import partitions_of
from ingest.codecs.errors import DecodeError, SourceError
from ingest.manifest import Manifest, ManifestBuilder
from ingest.normalize import EXCHANGE_TZ, midnight_ns
from ingest.replay.publisher import Replayer, ReplayStats
from ingest.replay.source import NS, RawMessage
from ingest.replay.spec import SourceSpec


class TimeWarp:
    """Compresses time-of-day ``[start_s, end_s)`` by ``multiple``; shifts what follows.

    ITCH timestamps are already time of day; JSON ones are epoch nanoseconds, so their base is
    the exchange midnight of the first message's date.
    """

    def __init__(self, start_s: int, end_s: int, multiple: float, codec: str) -> None:
        self.start_s = start_s
        self.end_s = end_s
        self.multiple = multiple
        self.codec = codec
        self.base_ns: int | None = 0 if codec == "itch" else None
        self._saved = (end_s - start_s) * NS * (1.0 - 1.0 / multiple)

    def _base(self, ts_ns: int) -> int:
        if self.base_ns is None:
            d = datetime.fromtimestamp(ts_ns / NS, tz=UTC).astimezone(EXCHANGE_TZ)
            self.base_ns = midnight_ns(d.date().isoformat())
        return self.base_ns

    def warp(self, ts_ns: int) -> int:
        base = self._base(ts_ns)
        t = ts_ns - base
        b0, b1 = self.start_s * NS, self.end_s * NS
        if t < b0:
            return ts_ns
        if t < b1:
            return base + b0 + int((t - b0) / self.multiple)
        return ts_ns - int(self._saved)

    def unwarp(self, ts_ns: int) -> int:
        if self.base_ns is None:
            return ts_ns
        t = ts_ns - self.base_ns
        b0 = self.start_s * NS
        b1w = b0 + (self.end_s - self.start_s) * NS / self.multiple
        if t < b0:
            return ts_ns
        if t < b1w:
            return self.base_ns + b0 + int((t - b0) * self.multiple)
        return ts_ns + int(self._saved)

    def apply(self, source: Iterable[RawMessage]) -> Iterator[RawMessage]:
        for m in source:
            yield RawMessage(self.warp(m.ts_ns), m.key, m.payload, m.codec)


def build_source(a: argparse.Namespace) -> tuple[Iterable[RawMessage], str, str, dict[str, object]]:
    """(messages, codec, trading date, manifest params) as ``tickscale replay`` builds them."""
    try:
        return SourceSpec(
            source=a.source, file=a.file, symbols=a.symbols, seed=a.seed, rate=a.rate,
            day=a.date, start=a.start, end=a.end, malformed_every=a.malformed_every, only=a.only,
        ).build()  # fmt: skip
    except SourceError as e:
        raise SystemExit(f"error: {e.where}: {e.what}") from None


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


def build_manifest(
    msgs: list[RawMessage], day: str, topic: str, partitions: int, **kw: Any
) -> Manifest:
    """What ``msgs`` must produce, computed as the publisher does while it sends."""
    b = ManifestBuilder()
    for m in msgs:
        # Market-wide messages are copied to every partition, keyed ones to one.
        b.observe(m.payload, m.codec, day, partitions if m.key is None else 1)
    return b.build(source="", topic=topic, partitions=partitions, **kw)


def _prepared(
    a: argparse.Namespace,
) -> tuple[list[RawMessage], str, str, dict[str, Any], TimeWarp | None]:
    """The whole day in memory: (messages, codec, date, params, burst warp)."""
    src, codec, day, params = build_source(a)
    warp = None
    if a.burst_multiple:
        warp = TimeWarp(a.burst_from, a.burst_to, a.burst_multiple, codec)
        src = warp.apply(src)
        params |= {"burst": [a.burst_from, a.burst_to, a.burst_multiple]}
    return list(src), codec, day, params, warp


def _clock_reporter(
    warp: TimeWarp | None, midnight: int, clock_stats: ReplayStats
) -> Callable[[ReplayStats], None]:
    """The publisher's progress as the feed's clock points (true market time, however the
    feed is paced), on stdout and in ``clock_stats`` for the scaler's clock in Redis."""

    def on_progress(st: ReplayStats) -> None:
        clock = st.source_clock_ns
        if warp is not None and clock:
            clock = warp.unwarp(clock)
        clock_stats.source_clock_ns = clock
        if clock:
            _emit({
                "wall": time.time(), "market": (midnight + clock) / NS,
                "msgs": st.source_messages, "records": st.records,
            })  # fmt: skip

    return on_progress


async def _send(
    a: argparse.Namespace, replayer: Replayer, clock_stats: ReplayStats, day: str
) -> Manifest:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, replayer.stop)
    stop = asyncio.Event()
    clock_task = None
    if a.redis:
        from ingest.replay.clock import publish_clock

        clock_task = asyncio.create_task(
            publish_clock(a.redis, clock_stats, day, replayer.speed, stop)
        )
    try:
        return await replayer.run()
    finally:
        stop.set()
        if clock_task is not None:
            await clock_task


async def run(a: argparse.Namespace) -> int:
    # A load generator must not be the bottleneck it measures. Generating the day (and, for a
    # window late in the day, rebuilding the state before it) and computing the manifest cost
    # more than publishing, so both happen here, before the publisher's pacing clock starts;
    # during the run it only sends. It also keeps the snapshot work from counting as lateness,
    # which would send a late window's first minutes at full speed.
    try:
        msgs, codec, day, params, warp = _prepared(a)
    except SourceError as e:
        # A user's file that cannot be replayed as it is: one line, exit 2, as the replay.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DecodeError as e:
        print(f"error: {a.file}: {e}", file=sys.stderr)
        return 2
    partitions = len(await partitions_of(a.bootstrap, a.topic))
    manifest = build_manifest(msgs, day, a.topic, partitions)
    _emit({"event": "prepared", "wall": time.time(), "msgs": len(msgs)})
    # Every full collection would walk the whole day held in msgs and stall the sends.
    freeze_startup_heap()
    midnight = midnight_ns(day) if codec == "itch" else 0
    clock_stats = ReplayStats()
    speed = None if a.speed == "max" else float(a.speed)
    on_progress = _clock_reporter(warp, midnight, clock_stats)
    replayer = Replayer(a.bootstrap, a.topic, msgs, speed, day, on_progress, manifest=False)
    sent = await _send(a, replayer, clock_stats, day)
    st = replayer.stats
    if replayer.interrupted:
        # Only what went out can be expected downstream.
        manifest = build_manifest(msgs[: st.source_messages], day, a.topic, partitions)
    manifest.records_sent = sent.records_sent
    manifest.pacing = sent.pacing
    manifest.source = a.source
    manifest.params = params
    manifest.write(a.manifest)
    _emit({
        "event": "done", "wall": time.time(), "msgs": st.source_messages, "records": st.records,
        "date": day, "elapsed_s": st.elapsed, "interrupted": replayer.interrupted,
        "ticks_expected": sum(s.ticks for s in manifest.symbols.values()),
        "deadletters_expected": manifest.deadletters_expected,
        **{"drift_" + k: v for k, v in st.drift_summary().items()},
    })  # fmt: skip
    return 130 if replayer.interrupted else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tickscale.loadtest.feed")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--redis")
    ap.add_argument("--source", default="synthetic")
    ap.add_argument("--file", type=Path)
    ap.add_argument("--symbols", type=int, default=50)
    ap.add_argument("--only")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--date")
    ap.add_argument("--from", dest="start")
    ap.add_argument("--to", dest="end")
    ap.add_argument("--speed", default="1")
    ap.add_argument("--malformed-every", type=int, default=0)
    ap.add_argument("--burst-from", type=int, default=0)
    ap.add_argument("--burst-to", type=int, default=0)
    ap.add_argument("--burst-multiple", type=float, default=0.0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
