"""Kafka principals and ACLs (compose/kafka/acls.txt) against a real broker
with SASL/SCRAM-SHA-512: each principal does what its grant allows and is
refused outside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
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
from tests.kafka_sasl import MECHANISM, PRINCIPALS, add_user, apply_acls, sasl_broker, tool
from tests.pipeline_utils import deadletters, readyz
from tickscale.localstack.net import HOST, free_port
from tickscale.localstack.topics import delete_groups, delete_topics, ensure_topics, list_topics

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


def _as(broker: dict[str, Any], who: str, tmp: Path) -> dict[str, str]:
    """The environment of a tickscale process running as ``who``."""
    d = tmp / f"secrets-{who}"
    d.mkdir(mode=0o700, exist_ok=True)
    (d / "tickscale_kafka_password").write_text(broker["passwords"][who])
    return os.environ | {"TICKSCALE_SECRETS_DIR": str(d), "TICKSCALE_KAFKA_USERNAME": who}


def _acl(broker: dict[str, Any], op: str, *args: str) -> None:
    tool("org.apache.kafka.tools.AclCommand", ["--bootstrap-server", broker["plain"], op, *args])


async def _fresh_topics(broker: dict[str, Any]) -> None:
    """The topics and the handlers' group as new: the tests above left records in them
    that are not a day's (b"x"), and offsets."""
    await delete_topics(broker["plain"], TOPICS)
    deadline = time.monotonic() + 60
    while set(TOPICS) & set(await list_topics(broker["plain"])):
        assert time.monotonic() < deadline, "topics still listed after deletion"
        await asyncio.sleep(0.2)
    await delete_groups(broker["plain"], [HANDLER_GROUP])
    await ensure_topics(broker["plain"], dict.fromkeys(TOPICS, 1))


@pytest.mark.slow
async def test_a_handler_refused_a_write_says_what_to_grant_and_goes_on_once_granted(
    broker: dict, topics: None, tmp_path: Path
) -> None:
    """An ACL missing for the handler's principal (here Write on md.deadletter) fails every
    commit with a dead letter in it, until an operator adds it. The handler tried again
    every few seconds without end, aborting and restoring, and never said what to grant."""
    grant = ("--allow-principal", "User:handler", "--operation", "Write", "--topic",
             DEADLETTER_TOPIC)  # fmt: skip
    await _fresh_topics(broker)
    _acl(broker, "--remove", "--force", *grant)
    port = free_port()
    log = tmp_path / "handler.log"
    cmd = [sys.executable, "-m", "tickscale", "handler", "--bootstrap", broker["sasl"],
           "--metrics-port", str(port), "--id", "denied"]  # fmt: skip
    with log.open("wb") as out:
        h = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                             env=_as(broker, "handler", tmp_path))  # fmt: skip
    manifest = tmp_path / "day.json"
    try:
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tickscale", "replay", "--bootstrap", broker["sasl"],
             "--manifest", str(manifest), "--no-progress", "--speed", "max", "--symbols", "3",
             "--date", "2024-11-25", "--from", "09:29", "--to", "09:30",
             "--malformed-every", "100"],
            env=_as(broker, "replay", tmp_path), check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        await asyncio.sleep(45)
        text = log.read_text()
        said = [ln for ln in text.splitlines() if "refuses this handler's commits" in ln]
        assert len(said) == 1, text[-3000:]
        assert f"Write and Describe on topic {DEADLETTER_TOPIC}" in said[0], said
        # Tried again on a backoff from 2 s to a minute: about 5 times in 45 s. Every few
        # seconds, it was 13.
        tries = text.count("aborting and restoring")
        assert 1 <= tries <= 6, text[-3000:]
        assert readyz(port) == 503
        assert h.poll() is None

        _acl(broker, "--add", *grant)
        verify = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tickscale", "verify", "--bootstrap", broker["sasl"],
             "--manifest", str(manifest), "--deadletter-topic", DEADLETTER_TOPIC,
             "--timeout", "120"],
            env=_as(broker, "verify", tmp_path), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        out = verify.stdout + verify.stderr
        assert verify.returncode == 0, out[-3000:] + log.read_text()[-3000:]
        assert "missing=0 duplicated=0 reordered=0 checksum_mismatch=0" in out, out[-3000:]
        n, expected = deadletters(out)
        assert n == expected > 0, out[-3000:]
        assert "takes this handler's commits again" in log.read_text()
        assert readyz(port) == 200
    finally:
        _acl(broker, "--add", *grant)
        h.kill()
        h.wait(10)
