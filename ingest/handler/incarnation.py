"""Which incarnation of the input topic a piece of state belongs to.

A topic deleted and created again under the same name is a new log: its offsets
start over, but the consumer group's committed offsets and the Redis snapshots
of the old one outlive it. Trusting them skips the new log up to the old
offset. Kafka gives every topic a fresh id when it is created (KIP-516); the
handler stamps that id on everything it keeps (the transaction's offset-commit
metadata, each snapshot) and, on restore, ignores state stamped with another.

aiokafka 0.14 speaks Metadata up to v5, which has no topic id, so the v12
request is defined here on its protocol layer (as fencing.py does for its own).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import IncompatibleBrokerVersion, KafkaError, for_code
from aiokafka.protocol.abstract import AbstractType
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

log = logging.getLogger(__name__)

_ZERO_UUID = bytes(16)


class Uuid(AbstractType[bytes]):
    """Kafka's UUID wire type: 16 raw bytes."""

    @classmethod
    def encode(cls, value: bytes) -> bytes:
        assert len(value) == 16
        return value

    @classmethod
    def decode(cls, data: BytesIO) -> bytes:
        value = data.read(16)
        if len(value) != 16:
            raise ValueError("Buffer underrun decoding a UUID")
        return value


class MetadataResponse_v12(Response):
    API_KEY = 3
    API_VERSION = 12
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            CompactArray(
                ("node_id", Int32),
                ("host", CompactString("utf-8")),
                ("port", Int32),
                ("rack", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            CompactArray(
                ("error_code", Int16),
                ("name", CompactString("utf-8")),
                ("topic_id", Uuid),
                ("is_internal", Boolean),
                (
                    "partitions",
                    CompactArray(
                        ("error_code", Int16),
                        ("partition_index", Int32),
                        ("leader_id", Int32),
                        ("leader_epoch", Int32),
                        ("replica_nodes", CompactArray(Int32)),
                        ("isr_nodes", CompactArray(Int32)),
                        ("offline_replicas", CompactArray(Int32)),
                        ("tags", TaggedFields),
                    ),
                ),
                ("topic_authorized_operations", Int32),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class MetadataRequest_v12(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 3
    API_VERSION = 12
    RESPONSE_TYPE = MetadataResponse_v12
    SCHEMA = Schema(
        (
            "topics",
            CompactArray(
                ("topic_id", Uuid), ("name", CompactString("utf-8")), ("tags", TaggedFields)
            ),
        ),
        ("allow_auto_topic_creation", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class TopicMetadataV12(Request[MetadataRequest_v12]):
    API_KEY = 3

    def __init__(self, topic: str) -> None:
        self._topic = topic

    def build(self, request_struct_class: type[MetadataRequest_v12]) -> MetadataRequest_v12:
        return request_struct_class([(_ZERO_UUID, self._topic, {})], False, False, {})


def format_topic_id(raw: bytes) -> str:
    """The id as Kafka's tools print it (URL-safe base64, no padding)."""
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def topic_id(consumer: AIOKafkaConsumer, topic: str) -> str | None:
    """The topic's id, or None where the broker predates topic ids (Metadata v12)."""
    client = consumer._client
    node_id = client.get_random_node()
    if node_id is None:
        await client.force_metadata_update()
        node_id = client.get_random_node()
    try:
        resp: Any = await client.send(node_id, TopicMetadataV12(topic))
    except (IncompatibleBrokerVersion, NotImplementedError) as e:
        log.warning("the broker gives no topic ids (%s): state is checked by offset only", e)
        return None
    for code, name, raw_id, *_ in resp.topics:
        if name != topic:
            continue
        if code:
            raise for_code(code)(f"metadata of topic {topic!r}")
        return None if raw_id == _ZERO_UUID else format_topic_id(raw_id)
    raise KafkaError(f"no metadata for topic {topic!r}")


# Offset-commit metadata ----------------------------------------------------------------------


def offset_metadata(txn_id: str, topic_id: str | None) -> str:
    """What a transaction's offset commit carries: who committed it (the transactional
    id, as before) and for which incarnation of the topic."""
    return orjson.dumps({"txn": txn_id, "topic_id": topic_id}).decode()


def metadata_topic_id(metadata: str) -> str | None:
    """The topic id an offset commit was stamped with; None for a commit made before
    commits carried one (its metadata is the bare transactional id) or by another
    client."""
    if not metadata.startswith("{"):
        return None
    try:
        d = orjson.loads(metadata)
    except orjson.JSONDecodeError:
        return None
    tid = d.get("topic_id") if isinstance(d, dict) else None
    return tid if isinstance(tid, str) else None


@dataclass(frozen=True, slots=True)
class Verdict:
    offset: int | None  # where to start; None: from the log start
    foreign: str  # why the committed offset was ignored; "" if it was not


def judge_committed(
    offset: int | None, metadata: str, expected_id: str | None, log_end: int
) -> Verdict:
    """Whether a committed offset belongs to this incarnation of the topic.

    A commit stamped with another topic id is from a deleted topic of the same name;
    one beyond the log end cannot be from this log either. A commit made before
    commits carried a topic id is accepted when it lies within the log: nothing
    tells it apart from this incarnation's then, and refusing it would replay every
    partition of a running fleet once on upgrade.
    """
    if offset is None:
        return Verdict(None, "")
    found = metadata_topic_id(metadata)
    if found is not None and expected_id is not None and found != expected_id:
        return Verdict(None, f"committed for topic id {found}, expected {expected_id}")
    if offset > log_end:
        return Verdict(None, f"committed offset {offset} is beyond the log end {log_end}")
    return Verdict(offset, "")
