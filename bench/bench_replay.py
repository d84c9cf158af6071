"""Replay feed throughput at ``--speed max``, against a per-record baseline.

One command: ``.venv/bin/python -m bench.bench_replay`` (starts its own broker).

The same synthetic window goes to fresh topics, alternately through the
publisher (``ingest.replay.publisher.Replayer``: records appended to one batch
per partition, sent whole) and through a baseline that gives the same records
to aiokafka one ``send()`` each, as the publisher did before. Prints records/s
and the publisher's CPU per record for each run, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer

from bench.results import write_result
from core.constants import HDR_BROADCAST, HDR_CODEC, HDR_DATE, HDR_SEQ
from core.runtime import freeze_startup_heap
from core.topology import RAW_CONFIG
from ingest.keys import partition_for
from ingest.replay.publisher import Replayer
from ingest.replay.source import ItchWindow, RawMessage, parse_hhmm
from ingest.replay.synthetic import SyntheticDay
from tickscale.localstack import KafkaBroker, ensure_topics

DAY = "2024-11-25"


async def baseline(bootstrap: str, topic: str, src: list[RawMessage], parts: int) -> int:
    """The same records and headers, one ``send()`` each."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
        max_batch_size=512 * 1024,
    )  # fmt: skip
    await producer.start()
    seqs = [0] * parts
    futs = []
    try:
        for m in src:
            for p in range(parts) if m.key is None else (partition_for(m.key, parts),):
                seqs[p] += 1
                headers = [(HDR_CODEC, b"itch"), (HDR_SEQ, str(seqs[p]).encode()),
                           (HDR_DATE, DAY.encode())]  # fmt: skip
                if m.key is None:
                    headers.append((HDR_BROADCAST, b"1"))
                futs.append(await producer.send(topic, m.payload, key=m.key, partition=p,
                                                headers=headers))  # fmt: skip
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return len(futs)


async def publisher(bootstrap: str, topic: str, src: list[RawMessage]) -> int:
    m = await Replayer(bootstrap, topic, src, None, DAY, manifest=False).run()
    return m.records_sent


async def main(args: argparse.Namespace) -> int:
    src = list(ItchWindow(SyntheticDay(args.symbols, 42), parse_hhmm(args.start),
                          parse_hhmm(args.end)))  # fmt: skip
    freeze_startup_heap()  # the window is held for every run; no collection should walk it
    broker = KafkaBroker(Path(tempfile.mkdtemp(prefix="tickscale-bench-")) / "kafka").start()
    try:
        rates: dict[str, list[float]] = {"baseline": [], "publisher": []}
        cpu: dict[str, list[float]] = {"baseline": [], "publisher": []}
        for i in range(args.rounds):
            for kind in ("baseline", "publisher"):
                topic = f"bench.replay.{kind}.{i}.{int(time.time())}"
                await ensure_topics(broker.bootstrap, {topic: args.partitions}, configs=RAW_CONFIG)
                c0, t0 = time.process_time(), time.monotonic()
                if kind == "baseline":
                    n = await baseline(broker.bootstrap, topic, src, args.partitions)
                else:
                    n = await publisher(broker.bootstrap, topic, src)
                dt, dc = time.monotonic() - t0, time.process_time() - c0
                rates[kind].append(n / dt)
                cpu[kind].append(dc / n * 1e6)
                print(f"round {i + 1} {kind:9s}: {n:,} records in {dt:.2f} s = {n / dt:,.0f}/s, "
                      f"{dc / n * 1e6:.1f} us CPU per record", flush=True)  # fmt: skip
        b, p = sum(rates["baseline"]), sum(rates["publisher"])
        bc, pc = sum(cpu["baseline"]), sum(cpu["publisher"])
        print(
            f"publisher vs per-record send(): {p / b:.1f}x the rate, "
            f"{pc / bc:.0%} of the CPU per record (means of {args.rounds} rounds)"
        )
        n_rounds = args.rounds
        path = write_result(
            "replay",
            {"publisher_records_per_s": round(p / n_rounds),
             "baseline_records_per_s": round(b / n_rounds),
             "publisher_cpu_us_per_record": round(pc / n_rounds, 2),
             "baseline_cpu_us_per_record": round(bc / n_rounds, 2),
             "records_per_round": n},
            {"rate_vs_baseline": round(p / b, 3), "cpu_vs_baseline": round(pc / bc, 3)},
            {"params": vars(args),
             "rounds": {"rates": rates, "cpu_us_per_record": cpu}},
        )  # fmt: skip
        print(f"result: {path}")
        return 0
    finally:
        broker.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", type=int, default=20)
    ap.add_argument("--start", default="09:29")
    ap.add_argument("--end", default="09:45")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    sys.exit(asyncio.run(main(ap.parse_args())))
