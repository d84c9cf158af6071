"""Kafka principals and ACLs (compose/kafka/acls.txt) against a real broker
with SASL/SCRAM-SHA-512: each principal does what its grant allows and is
refused outside it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from core.aiokafka_internals import delete_group
from core.constants import DEADLETTER_TOPIC, HANDLER_GROUP, RAW_TOPIC, TICKS_TOPIC
from tests.kafka_sasl import MECHANISM, PRINCIPALS, add_user, apply_acls, sasl_broker
from tickscale.localstack.net import HOST

TOPICS = (RAW_TOPIC, TICKS_TOPIC, DEADLETTER_TOPIC)
TIMEOUT_MS = 15000


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    b, sasl_port = sasl_broker(Path(tmp_path_factory.mktemp("kafka-sasl")))
    try:
        passwords = {p: uuid.uuid4().hex for p in PRINCIPALS}
        for name, pw in passwords.items():
            add_user(b.bootstrap, name, pw)
        assert apply_acls(b.bootstrap) >= 8
        yield {"plain": b.bootstrap, "sasl": f"{HOST}:{sasl_port}", "passwords": passwords}
    finally:
        b.stop()


@pytest.fixture(scope="module")
async def topics(broker: dict[str, Any]) -> AsyncIterator[None]:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker["plain"])
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 1, 1) for t in TOPICS])
    finally:
        await admin.close()
    yield


def auth(broker: dict[str, Any], who: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": broker["sasl"],
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": MECHANISM,
        "sasl_plain_username": who,
        "sasl_plain_password": broker["passwords"][who],
        "request_timeout_ms": TIMEOUT_MS,
    }


async def produce(broker: dict[str, Any], who: str, topic: str, **kw: Any) -> None:
    p = AIOKafkaProducer(**auth(broker, who), **kw)
    await p.start()
    try:
        if kw.get("transactional_id"):
            async with p.transaction():
                await p.send_and_wait(topic, b"x")
        else:
            await p.send_and_wait(topic, b"x")
    finally:
        await p.stop()


async def read_one(broker: dict[str, Any], who: str, topic: str, group: str | None = None) -> bytes:
    c = AIOKafkaConsumer(
        **auth(broker, who), group_id=group, auto_offset_reset="earliest",
        enable_auto_commit=False,
    )  # fmt: skip
    await c.start()
    try:
        if group is None:
            tp = TopicPartition(topic, 0)
            c.assign([tp])
            await c.seek_to_beginning(tp)
        else:
            c.subscribe([topic])
        msg = await c.getone()
        if group is not None:
            await c.commit()
        return bytes(msg.value or b"")
    finally:
        await c.stop()


async def refused(coro: Any, *errors: type[BaseException]) -> None:
    with pytest.raises(errors or (KafkaError,)):
        await coro


async def admin_delete(broker: dict[str, Any], who: str) -> Any:
    a = AIOKafkaAdminClient(**auth(broker, who))
    await a.start()
    try:
        return await a.delete_topics([RAW_TOPIC])
    finally:
        await a.close()


async def test_replay_writes_md_raw_and_nothing_else(broker: dict, topics: None) -> None:
    await produce(broker, "replay", RAW_TOPIC)
    await refused(produce(broker, "replay", TICKS_TOPIC), TopicAuthorizationFailedError)
    await refused(read_one(broker, "replay", RAW_TOPIC), TopicAuthorizationFailedError)


async def test_handler_reads_in_its_group_and_writes_in_its_transactions(
    broker: dict, topics: None
) -> None:
    await produce(broker, "replay", RAW_TOPIC)
    assert await read_one(broker, "handler", RAW_TOPIC, HANDLER_GROUP) == b"x"
    txn = f"tickscale.{HANDLER_GROUP}.h-{uuid.uuid4().hex[:6]}"
    await produce(broker, "handler", TICKS_TOPIC, transactional_id=txn)
    await produce(broker, "handler", DEADLETTER_TOPIC, transactional_id=txn)
    await refused(
        produce(broker, "handler", TICKS_TOPIC, transactional_id="someone-else"),
        TransactionalIdAuthorizationFailed,
    )
    await refused(produce(broker, "handler", RAW_TOPIC), TopicAuthorizationFailedError)
    await refused(
        read_one(broker, "handler", RAW_TOPIC, "another-group"), GroupAuthorizationFailedError
    )
    await refused(read_one(broker, "handler", TICKS_TOPIC), TopicAuthorizationFailedError)


async def test_scaler_describes_the_group_and_offsets_only(broker: dict, topics: None) -> None:
    await produce(broker, "replay", RAW_TOPIC)
    await read_one(broker, "handler", RAW_TOPIC, HANDLER_GROUP)
    a = AIOKafkaAdminClient(**auth(broker, "scaler"))
    await a.start()
    try:
        offsets = await a.list_consumer_group_offsets(HANDLER_GROUP)
        assert offsets[TopicPartition(RAW_TOPIC, 0)].offset >= 1
    finally:
        await a.close()
    c = AIOKafkaConsumer(**auth(broker, "scaler"))
    await c.start()
    try:
        ends = await c.end_offsets([TopicPartition(RAW_TOPIC, 0)])
        assert ends[TopicPartition(RAW_TOPIC, 0)] >= 1
    finally:
        await c.stop()
    await refused(read_one(broker, "scaler", RAW_TOPIC), TopicAuthorizationFailedError)
    await refused(
        read_one(broker, "scaler", RAW_TOPIC, HANDLER_GROUP),
        GroupAuthorizationFailedError, TopicAuthorizationFailedError,
    )  # fmt: skip
    await refused(produce(broker, "scaler", RAW_TOPIC), TopicAuthorizationFailedError)


@pytest.mark.parametrize("who", ["verify", "loadtest"])
async def test_readers_read_without_a_group(broker: dict, topics: None, who: str) -> None:
    await produce(broker, "handler", TICKS_TOPIC, transactional_id=f"tickscale.{HANDLER_GROUP}.r")
    assert await read_one(broker, who, TICKS_TOPIC) == b"x"
    await refused(produce(broker, who, TICKS_TOPIC), TopicAuthorizationFailedError)
    await refused(read_one(broker, who, RAW_TOPIC, HANDLER_GROUP), GroupAuthorizationFailedError)


@pytest.mark.parametrize("who", PRINCIPALS)
async def test_no_principal_deletes_a_topic(broker: dict, topics: None, who: str) -> None:
    with contextlib.suppress(KafkaError):
        resp = await admin_delete(broker, who)
        codes = [code for _, code in resp.topic_error_codes]
        assert codes and all(code != 0 for code in codes), resp
    a = AIOKafkaAdminClient(bootstrap_servers=broker["plain"])
    await a.start()
    try:
        assert RAW_TOPIC in await a.list_topics()
    finally:
        await a.close()


async def test_a_wrong_password_is_not_let_in(broker: dict, topics: None) -> None:
    p = AIOKafkaProducer(**(auth(broker, "replay") | {"sasl_plain_password": "wrong"}))
    with pytest.raises(KafkaError):
        await p.start()
    await p.stop()


async def test_the_load_test_runs_a_day_of_its_own_and_nothing_else(
    broker: dict, topics: None
) -> None:
    """User:loadtest makes, uses and deletes its run's topics, group and transactional ids
    (named lt-...), and may not make or delete anything else."""
    run = f"lt-{uuid.uuid4().hex[:6]}"
    raw, ticks, group = f"{run}.md.raw", f"{run}.md.ticks", f"{run}.feed-handlers"
    a = AIOKafkaAdminClient(**auth(broker, "loadtest"))
    await a.start()
    try:
        made = await a.create_topics([NewTopic(raw, 1, 1), NewTopic(ticks, 1, 1)])
        assert all(code == 0 for _, code, *_ in made.topic_errors), made
        await produce(broker, "loadtest", raw)  # its feed
        assert await read_one(broker, "loadtest", raw, group) == b"x"  # its handlers
        await produce(broker, "loadtest", ticks, transactional_id=f"tickscale.{group}.h")
        assert await delete_group(a, group) == 0
        resp = await a.delete_topics([raw, ticks])
        assert all(code == 0 for _, code in resp.topic_error_codes), resp
        created = await a.create_topics([NewTopic("md.other", 1, 1)])
        assert all(code != 0 for _, code, *_ in created.topic_errors), created
    finally:
        await a.close()
    await refused(produce(broker, "loadtest", RAW_TOPIC), TopicAuthorizationFailedError)
    await refused(
        produce(broker, "loadtest", TICKS_TOPIC, transactional_id=f"tickscale.{HANDLER_GROUP}.h"),
        TransactionalIdAuthorizationFailed,
    )
    await refused(
        read_one(broker, "loadtest", RAW_TOPIC, HANDLER_GROUP), GroupAuthorizationFailedError
    )
