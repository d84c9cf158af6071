"""The local Kafka/Redis/Prometheus harness works against the real servers."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tickscale.localstack import (
    KafkaBroker,
    PrometheusServer,
    RedisServer,
    consumer_groups_describe,
    ensure_kafka,
    ensure_topics,
    free_port,
)
from tickscale.localstack.kafka import KAFKA_VERSION, parse_consumer_groups_table
from tickscale.localstack.topics import MakeTopics, TopicSet


async def _produce(bootstrap: str, topic: str, values: list[bytes], partition: int = 0) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for v in values:
            await producer.send_and_wait(topic, v, key=v, partition=partition)
    finally:
        await producer.stop()


async def _consume(bootstrap: str, topic: str, n: int, within_s: float = 30.0) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + within_s
        while len(got) < n and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                got.extend(r.value for r in records if r.value is not None)
    finally:
        await consumer.stop()
    return got


def test_kafka_version_is_pinned_4_1() -> None:
    assert KAFKA_VERSION.startswith("4.1.")


def test_broker_logs_through_log4j2_only() -> None:
    # Kafka 4 dropped log4j 1: a reload4j binding left on the classpath would
    # win over log4j2 or split the broker's log in two.
    jars = {p.name for p in ensure_kafka().libs.glob("*.jar")}
    assert any(j.startswith("log4j-core-2.24.") for j in jars), sorted(jars)
    assert any(j.startswith("log4j-slf4j-impl-2.24.") for j in jars), sorted(jars)
    assert not [j for j in jars if "reload4j" in j or j.startswith("log4j-1.")]


def test_broker_writes_its_log_through_the_log4j2_config(kafka_broker: KafkaBroker) -> None:
    # If the JVM ignored the generated config, log4j2 would fall back to
    # ERROR-only console output and server.log would stay empty.
    log = kafka_broker.log_path.read_text(errors="replace")
    assert "Kafka Server started (kafka.server.KafkaRaftServer)" in log, log[-2000:]


def test_ensure_kafka_is_idempotent() -> None:
    first = ensure_kafka()
    t0 = time.monotonic()
    second = ensure_kafka()
    assert second == first
    assert time.monotonic() - t0 < 1.0
    assert any(second.libs.glob("kafka_2.13-*.jar"))


async def test_produce_and_consume_roundtrip(kafka_bootstrap: str, topics: TopicSet) -> None:
    values = [f"msg-{i}".encode() for i in range(5)]
    await _produce(kafka_bootstrap, topics.raw, values)
    assert await _consume(kafka_bootstrap, topics.raw, len(values)) == values


@pytest.mark.parametrize("topics", [3], indirect=True)
async def test_topics_fixture_partitions_and_idempotent_create(
    kafka_bootstrap: str, topics: TopicSet
) -> None:
    # A second ensure with a different count must neither fail nor change the topic.
    await ensure_topics(kafka_bootstrap, {topics.raw: 7, topics.ticks: 3})
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = {t["topic"]: t for t in await admin.describe_topics(topics.names)}
    finally:
        await admin.close()
    assert len(described[topics.raw]["partitions"]) == 3
    assert len(described[topics.ticks]["partitions"]) == 3
    assert len(described[topics.deadletter]["partitions"]) == 1
    assert len({topics.raw, topics.ticks, topics.deadletter, topics.group}) == 4


async def test_make_topics_gives_each_call_its_own_names(make_topics: MakeTopics) -> None:
    a = await make_topics(raw_partitions=1)
    b = await make_topics(raw_partitions=2)
    assert a.raw != b.raw and a.group != b.group
    assert b.ticks_partitions == 2


async def test_consumer_groups_describe_reports_lag(
    kafka_bootstrap: str, make_topics: MakeTopics
) -> None:
    ts = await make_topics(raw_partitions=2)
    await _produce(kafka_bootstrap, ts.raw, [b"a%d" % i for i in range(10)], partition=0)
    await _produce(kafka_bootstrap, ts.raw, [b"b%d" % i for i in range(5)], partition=1)

    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=ts.group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp0, tp1 = TopicPartition(ts.raw, 0), TopicPartition(ts.raw, 1)
        consumer.assign([tp0, tp1])
        await consumer.commit({tp0: 4, tp1: 5})
    finally:
        await consumer.stop()

    rows = await asyncio.to_thread(consumer_groups_describe, kafka_bootstrap, ts.group)
    by_partition = {r["partition"]: r for r in rows if r["topic"] == ts.raw}
    assert set(by_partition) == {0, 1}, rows
    assert by_partition[0]["current_offset"] == 4
    assert by_partition[0]["log_end_offset"] == 10
    assert by_partition[0]["lag"] == 6
    assert by_partition[1]["lag"] == 0
    assert all(r["group"] == ts.group for r in rows)


@pytest.mark.slow
def test_consumer_groups_describe_unknown_group(kafka_bootstrap: str) -> None:
    assert consumer_groups_describe(kafka_bootstrap, "no-such-group-xyz") == []


def test_parse_consumer_groups_table_handles_missing_offsets() -> None:
    text = """
Consumer group 'g' has no active members.

GROUP  TOPIC  PARTITION  CURRENT-OFFSET  LOG-END-OFFSET  LAG  CONSUMER-ID  HOST  CLIENT-ID
g      t      0          -               12              -    -            -     -
g      t      1          3               5               2    c-1          /127.0.0.1  my client
"""
    rows = parse_consumer_groups_table(text)
    assert rows[0]["current_offset"] is None and rows[0]["log_end_offset"] == 12
    assert rows[1]["lag"] == 2 and rows[1]["client_id"] == "my client"


@pytest.mark.slow
@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
async def test_broker_restart_keeps_data_and_address(
    kafka_broker: KafkaBroker, topics: TopicSet, crash: bool
) -> None:
    bootstrap = kafka_broker.bootstrap
    await _produce(bootstrap, topics.raw, [b"before"])
    # A SIGKILLed JVM leaves acked records in the page cache, so they survive
    # too; what changes is that the broker recovers its logs on the way up.
    await kafka_broker.arestart(kill=crash)
    assert kafka_broker.bootstrap == bootstrap
    await _produce(bootstrap, topics.raw, [b"after"])
    assert await _consume(bootstrap, topics.raw, 2) == [b"before", b"after"]


@pytest.mark.slow
def test_broker_start_failure_names_log(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        broker = KafkaBroker(tmp_path / "kafka", port=port, start_timeout=60)
        with pytest.raises((RuntimeError, TimeoutError)) as excinfo:
            broker.start()
    assert str(broker.log_path) in str(excinfo.value)
    assert not broker.running


def test_redis_up_down_up(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.set("k", "v")
        assert client.get("k") == b"v"

        redis_server.stop()
        with pytest.raises(redis.ConnectionError):
            client.ping()

        redis_server.start()
        assert client.ping()
        # No persistence: an outage loses state, as it would for the handlers.
        assert client.get("k") is None
    finally:
        client.close()


def test_servers_start_from_a_relative_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `tickscale up` without --out hands its servers paths relative to the
    # caller's directory, while each server runs inside its own directory.
    monkeypatch.chdir(tmp_path)
    with RedisServer(work_dir=Path("run/redis")) as srv:
        client = redis.Redis.from_url(srv.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            assert client.ping()
        finally:
            client.close()
    with PrometheusServer(work_dir=Path("run/prometheus")) as prom:
        assert prom.running
    assert (tmp_path / "run/redis/redis.log").is_file()
    assert (tmp_path / "run/prometheus/data").is_dir()


def test_redis_url_points_at_running_server(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()
        assert redis_url.endswith("/0")
    finally:
        client.close()


def test_prometheus_scrapes_a_target() -> None:
    registry = CollectorRegistry()
    Counter("tickscale_test_events", "events", registry=registry).inc(3)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        with PrometheusServer([f"127.0.0.1:{port}"]) as prom:
            up = prom.wait_for('up{job="tickscale"} == 1', timeout=30)
            assert up[0]["metric"]["instance"] == f"127.0.0.1:{port}"
            assert prom.query("up")[0]["value"][1] == "1"
            events = prom.wait_for("tickscale_test_events_total", timeout=10)
            assert float(events[0]["value"][1]) == 3.0
    finally:
        server.shutdown()
        thread.join(timeout=5)
