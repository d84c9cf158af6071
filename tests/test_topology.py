"""The pipeline's topics are created with the settings their roles need."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from core import constants as c
from core.topology import RAW_CONFIG, co_partitioned, create_topics, partitions_of
from tickscale.localstack.topics import delete_topics, differing_configs, ensure_topics

# Far from any wall clock this test runs at: a publisher with a wrong clock.
_OLD_MS = 1_000_000_000_000  # 2001-09-09


async def _first_record(bootstrap: str, topic: str) -> ConsumerRecord[bytes, bytes]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        return await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()


async def test_raw_records_carry_the_broker_append_time(kafka_bootstrap: str) -> None:
    prefix = f"t-topology-{uuid.uuid4().hex[:8]}"
    raw, ticks, dl = f"{prefix}.raw", f"{prefix}.ticks", f"{prefix}.dl"
    await create_topics(kafka_bootstrap, 2, 1, raw=raw, ticks=ticks, deadletter=dl)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        before = time.time()
        await producer.send_and_wait(raw, b"m", key=b"k", timestamp_ms=_OLD_MS)
        await producer.send_and_wait(ticks, b"t", key=b"k", timestamp_ms=_OLD_MS)
        after = time.time()
        got_raw = await _first_record(kafka_bootstrap, raw)
        got_tick = await _first_record(kafka_bootstrap, ticks)
    finally:
        await producer.stop()
        await delete_topics(kafka_bootstrap, [raw, ticks, dl])
    # md.raw: the broker's clock (timestamp type 1 = LogAppendTime), so latency and
    # lag in seconds start when a message reached Kafka, not when a publisher said.
    assert got_raw.timestamp_type == 1
    assert before - 1 <= got_raw.timestamp / 1000 <= after + 1
    # md.ticks keeps what its producer set.
    assert got_tick.timestamp_type == 0
    assert got_tick.timestamp == _OLD_MS


async def test_an_existing_topic_with_other_settings_is_named_and_left_alone(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    # md.raw from an older version of this project: the publisher's clock (CreateTime).
    prefix = f"t-topology-{uuid.uuid4().hex[:8]}"
    raw, ticks, dl = f"{prefix}.raw", f"{prefix}.ticks", f"{prefix}.dl"
    old = RAW_CONFIG | {"message.timestamp.type": "CreateTime"}
    await ensure_topics(kafka_bootstrap, {raw: 2}, configs=old)
    try:
        with caplog.at_level(logging.WARNING, logger="tickscale.localstack.topics"):
            await create_topics(kafka_bootstrap, 2, 1, raw=raw, ticks=ticks, deadletter=dl)
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1, warned
        assert raw in warned[0]
        assert "message.timestamp.type=CreateTime, not LogAppendTime" in warned[0]
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            left = await differing_configs(admin, [raw], RAW_CONFIG)
        finally:
            await admin.close()
        assert left == [(raw, "message.timestamp.type", "CreateTime", "LogAppendTime")]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tickscale.localstack.topics"):
            await create_topics(kafka_bootstrap, 2, 1, raw=f"{prefix}.raw2", ticks=ticks,
                                deadletter=dl)  # fmt: skip
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    finally:
        await delete_topics(kafka_bootstrap, [raw, f"{prefix}.raw2", ticks, dl])


async def test_topics_that_are_not_co_partitioned_are_named(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert co_partitioned(12, 12) and co_partitioned(24, 12) and not co_partitioned(8, 12)
    prefix = f"t-copart-{uuid.uuid4().hex[:8]}"
    names = {"raw": f"{prefix}.raw", "ticks": f"{prefix}.ticks", "deadletter": f"{prefix}.dl"}
    try:
        with caplog.at_level(logging.WARNING, logger="core.topology"):
            await create_topics(kafka_bootstrap, 3, 2, **names)
        warned = [r.getMessage() for r in caplog.records if r.name == "core.topology"]
        assert len(warned) == 1, warned
        assert f"{prefix}.raw has 3 partitions and {prefix}.ticks 2" in warned[0]
        caplog.clear()
        # The existing topics keep their counts: the check reads them, not the request.
        with caplog.at_level(logging.WARNING, logger="core.topology"):
            await create_topics(kafka_bootstrap, 4, 2, **names)
        assert [r.name for r in caplog.records].count("core.topology") == 1
        caplog.clear()
        ok = {k: f"{v}2" for k, v in names.items()}
        with caplog.at_level(logging.WARNING, logger="core.topology"):
            await create_topics(kafka_bootstrap, 4, 2, **ok)
        assert not [r for r in caplog.records if r.name == "core.topology"]
    finally:
        await delete_topics(kafka_bootstrap, [*names.values(), *(f"{v}2" for v in names.values())])


async def test_the_topics_command_co_partitions_by_default(kafka_bootstrap: str) -> None:
    # The command creates the pipeline's own names, which no other test uses.
    names = [c.RAW_TOPIC, c.TICKS_TOPIC, c.DEADLETTER_TOPIC]
    cmd = [sys.executable, "-m", "tickscale", "topics", "--bootstrap", kafka_bootstrap]
    try:
        done = await asyncio.to_thread(
            subprocess.run, [*cmd, "--raw-partitions", "8"], capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert len(await partitions_of(kafka_bootstrap, c.RAW_TOPIC)) == 8
        # md.ticks follows md.raw unless told otherwise, as `up` and the compose stack need.
        assert len(await partitions_of(kafka_bootstrap, c.TICKS_TOPIC)) == 8
        assert "does not divide" not in done.stderr + done.stdout
    finally:
        await delete_topics(kafka_bootstrap, names)


async def test_partitions_of_a_missing_topic_names_it(kafka_bootstrap: str) -> None:
    missing = f"t-topology-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError, match=f"topic {missing!r} does not exist"):
        await partitions_of(kafka_bootstrap, missing)
