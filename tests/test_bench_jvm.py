"""The handler bench reads the broker's JIT compile time and GC pauses from the JVM's counters."""

from __future__ import annotations

import os
import uuid

from bench.jvm import compile_seconds, gc_pauses, perf_counters
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


async def test_the_brokers_collections_are_counted(kafka_broker: KafkaBroker) -> None:
    assert kafka_broker.pid is not None
    before = gc_pauses(kafka_broker.pid)
    assert before is not None
    n, s = before
    assert n >= 0 and s >= 0
    # A young generation sized for the bench's load may not have filled yet, so
    # the count is only required to be read, from the young collector's counter
    # at least, and never to fall.
    assert "sun.gc.collector.0.invocations" in (perf_counters(kafka_broker.pid) or {})
    topic = f"t-gc-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_broker.bootstrap, {topic: 1})
    await delete_topics(kafka_broker.bootstrap, [topic])
    after = gc_pauses(kafka_broker.pid)
    assert after is not None and after[0] >= n and after[1] >= s


def test_a_process_that_is_no_jvm_has_no_counters() -> None:
    assert perf_counters(os.getpid()) is None
    assert compile_seconds(os.getpid()) is None
    assert gc_pauses(os.getpid()) is None
