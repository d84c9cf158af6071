"""``tickscale verify`` across a broker that goes away in the middle of its read.

A read cut short by an outage must not pass for the topic's content: verify waits for the
broker (up to ``--outage-deadline``) and reads on from where it was, or, past that,
says in one line that nothing was concluded and exits 3, never a count of ticks that are
only out of reach, and never a traceback.

The real session broker is killed and restarted under a real ``tickscale verify``
process: the fault needs nothing mocked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from core.aiokafka_internals import stop_consumer
from ingest.manifest import Manifest, SymbolExpectation
from ingest.ticks import SymbolLedger
from tickscale.localstack.kafka import KafkaBroker
from tickscale.localstack.topics import MakeTopics, TopicSet

pytestmark = pytest.mark.slow

_TICKS = 2_000
# Time for verify to start and read what is already there before the broker is killed;
# each test checks from verify's own log that the kill did land mid-read.
_SETTLE_S = 5.0


def _day(tmp_path: Path, topics: TopicSet) -> tuple[list[bytes], Path]:
    """A symbol's ticks, serialised, and the manifest that expects exactly them."""
    ticks = [
        {"symbol": "AAA", "seq": i, "kind": "trade", "px": 100 + i % 7}
        for i in range(1, _TICKS + 1)
    ]
    ledger = SymbolLedger()
    for t in ticks:
        ledger.add(t)
    m = Manifest(
        source="synthetic",
        topic=topics.raw,
        partitions=topics.raw_partitions,
        symbols={"AAA": SymbolExpectation(ticks=len(ticks), checksum=ledger.checksum)},
    )
    path = tmp_path / "manifest.json"
    m.write(path)
    return [orjson.dumps(t) for t in ticks], path


async def _publish(bootstrap: str, topic: str, values: list[bytes]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await p.start()
    try:
        for v in values:
            await p.send(topic, v, partition=0)  # one symbol: one partition keeps its order
        await p.flush()
    finally:
        await p.stop()


def _verify(topics: TopicSet, manifest: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "tickscale", "verify", "--bootstrap", topics.bootstrap,
            "--topic", topics.ticks, "--deadletter-topic", topics.deadletter,
            "--manifest", str(manifest), "--timeout", "120", *args,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _mid_read(err: str, topics: TopicSet) -> None:
    """The outage was met while reading the tick topic (not while reaching the broker)."""
    assert f"no answer from the broker at {topics.bootstrap} while reading {topics.ticks}" in err, (
        err[-3000:]
    )


async def _half_read(
    topics: TopicSet, values: list[bytes], manifest: Path, *args: str
) -> subprocess.Popen[str]:
    """A verify running, half the ticks read and the rest awaited."""
    await _publish(topics.bootstrap, topics.ticks, values[: _TICKS // 2])
    proc = _verify(topics, manifest, *args)
    await asyncio.sleep(_SETTLE_S)
    assert proc.poll() is None, proc.communicate()
    return proc


async def test_verify_reads_on_across_a_broker_restart(
    make_topics: MakeTopics, tmp_path: Path, kafka_broker: KafkaBroker
) -> None:
    topics = await make_topics(raw_partitions=1)
    values, manifest = _day(tmp_path, topics)
    proc = await _half_read(topics, values, manifest)
    try:
        await kafka_broker.astop(kill=True)
        await asyncio.sleep(3.0)
    finally:
        await kafka_broker.astart()
    # The rest arrives after the outage, as a pipeline catching up would deliver it.
    await _publish(topics.bootstrap, topics.ticks, values[_TICKS // 2 :])
    out, err = await asyncio.to_thread(proc.communicate, timeout=240)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    _mid_read(err, topics)
    assert "is back after" in err, err[-3000:]
    assert f"ticks read={_TICKS} expected={_TICKS}" in out, out


async def test_verify_gives_up_past_the_outage_deadline_without_a_verdict(
    make_topics: MakeTopics, tmp_path: Path, kafka_broker: KafkaBroker
) -> None:
    topics = await make_topics(raw_partitions=1)
    values, manifest = _day(tmp_path, topics)
    proc = await _half_read(topics, values, manifest, "--outage-deadline", "8")
    try:
        await kafka_broker.astop(kill=True)
        started = time.monotonic()
        out, err = await asyncio.to_thread(proc.communicate, timeout=120)
        took = time.monotonic() - started
    finally:
        await kafka_broker.astart()
    assert proc.returncode == 3, out[-2000:] + err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    _mid_read(err, topics)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert f"--bootstrap {topics.bootstrap}" in errors[0], errors[0]
    assert "--outage-deadline" in errors[0] and "nothing was concluded" in errors[0], errors[0]
    # No verdict: half the ticks out of reach are not reported as missing.
    assert "ticks read=" not in out and "missing" not in out, out
    # The deadline, plus one probe and the close: not the client's own timeouts stacked up.
    assert took < 8 + 30, took


async def test_a_tick_topic_deleted_under_verify_is_named_not_waited_out(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    """The client retries a deleted topic as it does an absent broker, but the broker is
    there and says so: verify names the topic at once, concludes nothing (exit 3), and
    the client's error for each metadata answer (thousands a second) is cut to one line."""
    from tickscale.localstack.topics import delete_topics

    topics = await make_topics(raw_partitions=1)
    values, manifest = _day(tmp_path, topics)
    proc = await _half_read(topics, values, manifest, "--outage-deadline", "150")
    await delete_topics(topics.bootstrap, [topics.ticks])
    started = time.monotonic()
    out, err = await asyncio.to_thread(proc.communicate, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 3, out[-2000:] + err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: --topic {topics.ticks}: was deleted while verify read it; nothing was "
        "concluded (the ticks it held are gone with it)"
    ], err[-3000:]
    assert "ticks read=" not in out and "missing" not in out, out
    assert took < 60, took  # not the 150 s outage deadline
    assert len(err.splitlines()) < 20, err[-3000:]


async def test_a_tick_topic_recreated_under_verify_concludes_nothing(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    """Deleted and created again while verify was not looking (stopped here, so no probe
    falls in the gap): the new log holds a thousand wrong ticks, then the day's second
    half. Read on from the old log's position, the two halves verify saw make an exact
    day that the topic does not hold; verify must say it read two logs, exit 3."""
    from tickscale.localstack.topics import delete_topics, ensure_topics, list_topics

    topics = await make_topics(raw_partitions=1)
    values, manifest = _day(tmp_path, topics)
    proc = await _half_read(topics, values, manifest, "--outage-deadline", "150")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        await delete_topics(topics.bootstrap, [topics.ticks])
        async with asyncio.timeout(30):  # deletion is asynchronous
            while topics.ticks in await list_topics(topics.bootstrap):
                await asyncio.sleep(0.2)
        await ensure_topics(topics.bootstrap, {topics.ticks: 1})
        wrong = [
            orjson.dumps({"symbol": "AAA", "seq": i, "kind": "trade", "px": -1})
            for i in range(1, _TICKS // 2 + 1)
        ]
        await _publish(topics.bootstrap, topics.ticks, wrong + values[_TICKS // 2 :])
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out, err = await asyncio.to_thread(proc.communicate, timeout=120)
    assert proc.returncode == 3, out[-2000:] + err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: --topic {topics.ticks}: was deleted and created again while verify read it; "
        "nothing was concluded (the ticks it held are gone with it)"
    ], err[-3000:]
    assert "Traceback" not in err and "missing=0" not in out, out + err[-3000:]


async def test_a_consumer_stops_cleanly_after_its_broker_went_away(
    make_topics: MakeTopics, kafka_broker: KafkaBroker
) -> None:
    topics = await make_topics(raw_partitions=1)
    await _publish(topics.bootstrap, topics.ticks, [b"x"] * 10)
    tp = TopicPartition(topics.ticks, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=topics.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got = 0
        async with asyncio.timeout(30):
            while got < 10:
                got += sum(len(v) for v in (await consumer.getmany(timeout_ms=500)).values())
        await kafka_broker.astop(kill=True)
        # Long enough for a fetch to fail and wait out its retry backoff.
        t = time.monotonic()
        while time.monotonic() - t < 2.0:
            await consumer.getmany(timeout_ms=500)
        await stop_consumer(consumer)  # raised CancelledError from the client's own task
    finally:
        await kafka_broker.astart()
    # Nothing of the client is left running (its metadata task retried forever before).
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert not [t for t in left if "aiokafka" in repr(t.get_coro())], left
