"""Where a handler's per-message time goes, without a broker: one process, one core.

One command: ``.venv/bin/python -m bench.bench_steps [--messages N] [--symbols S]``.

Times, over the same synthetic-day ITCH messages: decoding alone (the baseline of
the ratios), decoding with the order book and the tick dicts (``Normalizer.on_itch``),
serialising those ticks, and the handler's whole per-record step
(``PartitionWorker.apply``: headers, feed sequence, decode, book, ticks, serialisation).
Each figure is microseconds per feed message, the best of ``--rounds``. Set beside the
handler bench's messages per second, the difference is what the Kafka client, the
transaction and the loop cost per message.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiokafka import ConsumerRecord, TopicPartition

from bench.results import write_result
from core.constants import HDR_CODEC, HDR_DATE, HDR_SEQ
from ingest.codecs import itch
from ingest.handler.partition import Outputs, PartitionWorker
from ingest.normalize import Normalizer
from ingest.replay.synthetic import SyntheticDay

DAY = "2026-12-04"


def best_us(fn: Callable[[], object], n: int, rounds: int) -> float:
    """The fastest of ``rounds`` runs of ``fn``, in microseconds per message."""
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def _record(i: int, payload: bytes) -> ConsumerRecord[bytes, bytes]:
    """A raw record as the handler receives it: the feed's sequence, codec and date headers."""
    headers = [(HDR_SEQ, str(i + 1).encode()), (HDR_CODEC, b"itch"), (HDR_DATE, DAY.encode())]
    return ConsumerRecord(
        "raw", 0, i, 0, 0, b"K", payload, None, 1, len(payload), headers
    )  # fmt: skip


def steps(msgs: list[bytes], rounds: int) -> dict[str, float]:
    n = len(msgs)

    def on_itch() -> None:
        z, out = Normalizer(), []
        for p in msgs:
            z.on_itch(p, DAY, 1, out)
            out.clear()

    z, ticks = Normalizer(), []
    for p in msgs:
        z.on_itch(p, DAY, 1, ticks)
    records = [_record(i, p) for i, p in enumerate(msgs)]

    def apply() -> None:
        w = PartitionWorker(TopicPartition("raw", 0), "g", Outputs("t", 4, "dl"), None, 3600.0)
        out: list[dict[str, Any]] = []
        values: list[bytes] = []
        for r in records:
            w.apply(r, 1, out, values=values)
            if len(out) > 4096:  # a batch's worth, as the handler holds them
                out.clear()
                values.clear()

    return {
        "decode_us": best_us(lambda: [itch.decode(p) for p in msgs], n, rounds),
        "on_itch_us": best_us(on_itch, n, rounds),
        "serialise_us": best_us(lambda: [orjson.dumps(t) for t in ticks], n, rounds),
        "apply_us": best_us(apply, n, rounds),
        "ticks_per_msg": len(ticks) / n,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=400_000)
    ap.add_argument("--symbols", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    day = SyntheticDay(symbols=args.symbols, seed=1)
    msgs = [m.payload for m in itertools.islice(day, args.messages) if m.codec == "itch"]
    fig = steps(msgs, args.rounds)
    print(f"{len(msgs):,} synthetic-day ITCH messages, {args.symbols} symbols, "
          f"best of {args.rounds} rounds, us per message:")  # fmt: skip
    for k, label in (("decode_us", "decode (baseline)"),
                     ("on_itch_us", "decode + book + tick dicts"),
                     ("serialise_us", f"serialise ticks ({fig['ticks_per_msg']:.2f} per msg)"),
                     ("apply_us", "whole per-record step")):  # fmt: skip
        print(f"  {label:40}{fig[k]:7.2f} us  = {fig[k] / fig['decode_us']:.2f}x")
    ratios = {k: round(fig[k] / fig["decode_us"], 3) for k in fig if k.endswith("_us")}
    figures = {k: round(v, 3) for k, v in fig.items()}
    print(f"result: {write_result('steps', figures, ratios, {'params': vars(args)})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
