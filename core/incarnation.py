"""Which incarnation of the input topic a piece of state belongs to.

A topic deleted and created again under the same name is a new log: its offsets
start over, but the consumer group's committed offsets and the Redis snapshots
of the old one outlive it. Trusting them skips the new log up to the old
offset. Kafka gives every topic a fresh id when it is created (KIP-516); the
handler stamps that id on everything it keeps (the transaction's offset-commit
metadata, each snapshot) and, on restore, ignores state stamped with another.

aiokafka 0.14 speaks Metadata up to v5, which has no topic id; the v12 request
lives in ``core/aiokafka_internals.py``.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import IncompatibleBrokerVersion

from core.aiokafka_internals import raw_topic_id

log = logging.getLogger(__name__)


def format_topic_id(raw: bytes) -> str:
    """The id as Kafka's tools print it (URL-safe base64, no padding)."""
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# Said once per process: the scaler asks at every poll.
_NO_IDS_SAID: set[str] = set()


async def topic_id(consumer: AIOKafkaConsumer, topic: str) -> str | None:
    """The topic's id, or None where the broker predates topic ids (Metadata v12)."""
    try:
        raw = await raw_topic_id(consumer, topic)
    except (IncompatibleBrokerVersion, NotImplementedError) as e:
        if not _NO_IDS_SAID:
            _NO_IDS_SAID.add(str(e))
            log.warning("the broker gives no topic ids (%s): state is checked by offset only", e)
        return None
    return None if raw is None else format_topic_id(raw)


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
