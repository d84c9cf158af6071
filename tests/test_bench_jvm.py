"""The handler bench reads the broker's JIT compile time from the JVM's own counters."""

from __future__ import annotations

import os
import uuid

from bench.jvm import compile_seconds, perf_counters
from tickscale.localstack import KafkaBroker, delete_topics, ensure_topics


async def test_the_brokers_compile_time_is_read_and_only_grows(kafka_broker: KafkaBroker) -> None:
    assert kafka_broker.pid is not None
    counters = perf_counters(kafka_broker.pid)
    assert counters is not None and counters["sun.os.hrt.frequency"] > 0
    before = compile_seconds(kafka_broker.pid)
    # A broker that has started has compiled something, and not for hours.
    assert before is not None and 0 < before < 3600
    topic = f"t-jvm-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_broker.bootstrap, {topic: 3})
    await delete_topics(kafka_broker.bootstrap, [topic])
    after = compile_seconds(kafka_broker.pid)
    assert after is not None and after >= before


def test_a_process_that_is_no_jvm_has_no_counters() -> None:
    assert perf_counters(os.getpid()) is None
    assert compile_seconds(os.getpid()) is None
