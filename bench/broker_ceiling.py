"""The broker's own ceiling: Kafka's Java producer and consumer performance tools
(org.apache.kafka.tools.ProducerPerformance / ConsumerPerformance, from the jars the
local stack runs the broker from) against the bench's broker, at the raw records'
size. No Python client can beat these on the same broker and cores.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
from dataclasses import dataclass

from tickscale.localstack.kafka import ensure_kafka

_PRODUCED = re.compile(r"(\d+) records sent, ([\d.]+) records/sec")


@dataclass(frozen=True, slots=True)
class Ceiling:
    produce: float  # records/s
    consume: float  # records/s (fetch time only: group join excluded)


def _run(main_class: str, args: list[str]) -> str:
    cmd = ensure_kafka().java_command(main_class, args, ("-Xmx512m",))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{main_class} failed: {done.stderr[-2000:]}")
    return done.stdout


def produce_rate(bootstrap: str, topic: str, records: int, size: int) -> float:
    """ProducerPerformance at full speed (acks=all, linger 2 ms); records per second."""
    out = _run("org.apache.kafka.tools.ProducerPerformance", [
        "--topic", topic, "--num-records", str(records), "--record-size", str(size),
        "--throughput", "-1", "--producer-props", f"bootstrap.servers={bootstrap}",
        "acks=all", "linger.ms=2",
    ])  # fmt: skip
    found = _PRODUCED.findall(out)
    if not found:
        raise RuntimeError(f"ProducerPerformance printed no total: {out[-1000:]}")
    return float(found[-1][1])


def consume_rate(bootstrap: str, topic: str, records: int, group: str) -> float:
    """ConsumerPerformance over ``records`` records; its fetch-time records per second."""
    out = _run("org.apache.kafka.tools.ConsumerPerformance", [
        "--bootstrap-server", bootstrap, "--topic", topic, "--messages", str(records),
        "--group", group, "--timeout", "60000",
    ])  # fmt: skip
    lines = [ln for ln in out.splitlines() if "," in ln]
    rows = list(csv.reader(io.StringIO("\n".join(lines)), skipinitialspace=True))
    if len(rows) < 2:
        raise RuntimeError(f"ConsumerPerformance printed no figures: {out[-1000:]}")
    row = dict(zip(rows[0], rows[-1], strict=False))
    return float(row.get("fetch.nMsg.sec") or row["nMsg.sec"])


def measure(bootstrap: str, topic: str, records: int, size: int, group: str) -> Ceiling:
    """Produce ``records`` records of ``size`` bytes into ``topic``, then consume them."""
    p = produce_rate(bootstrap, topic, records, size)
    return Ceiling(p, consume_rate(bootstrap, topic, records, group))
