"""The topics the pipeline needs, with the settings each one's role calls for."""

from __future__ import annotations

import logging

from core import constants as c
from core.admin import ensure_topics
from core.secrets import kafka_auth

# md.raw must keep a whole day: a partition restored without a snapshot is
# rebuilt by replaying it from the start. Its record timestamps are the broker's
# append times, so the handlers' end-to-end latency and the scaler's lag in
# seconds start when a message reached Kafka, whatever the publisher's clock or
# buffering (the exchange's own event time travels in the payload).
RAW_CONFIG = {
    "retention.ms": str(7 * 24 * 3600 * 1000),
    "max.message.bytes": "1048576",
    "message.timestamp.type": "LogAppendTime",
}
TICKS_CONFIG = {"retention.ms": str(7 * 24 * 3600 * 1000)}

log = logging.getLogger(__name__)


def co_partitioned(raw_partitions: int, ticks_partitions: int) -> bool:
    """Whether each raw partition's ticks all land in one ticks partition.

    Both topics are keyed by symbol with the default partitioner, so a symbol's
    ticks partition is its raw partition modulo the ticks count exactly when
    that count divides the raw count; then a handler's transaction for one
    input partition writes to one ticks partition, not to many.
    """
    return raw_partitions % ticks_partitions == 0


async def create_topics(
    bootstrap: str,
    raw_partitions: int,
    ticks_partitions: int,
    replication: int = 1,
    raw: str = c.RAW_TOPIC,
    ticks: str = c.TICKS_TOPIC,
    deadletter: str = c.DEADLETTER_TOPIC,
) -> None:
    """Create the raw, tick and dead-letter topics if missing (idempotent).

    Warns when the topics, as they now are, are not co-partitioned: correct,
    but every transaction then writes to several ticks partitions.
    """
    await ensure_topics(bootstrap, {raw: raw_partitions}, replication, RAW_CONFIG)
    await ensure_topics(
        bootstrap, {ticks: ticks_partitions, deadletter: 1}, replication, TICKS_CONFIG
    )
    # An existing topic keeps its own count, so the check reads what is there.
    ids = await partition_ids(bootstrap, [raw, ticks])
    n_raw, n_ticks = len(ids[raw]), len(ids[ticks])
    if not co_partitioned(n_raw, n_ticks):
        log.warning(
            "%s has %d partitions and %s %d: %d does not divide %d, so each transaction "
            "writes to several %s partitions (slower, still exactly once); use equal counts",
            raw, n_raw, ticks, n_ticks, n_ticks, n_raw, ticks,
        )  # fmt: skip


class TopicMissing(RuntimeError):
    """The broker has no topic of this name."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic!r} does not exist")
        self.topic = topic


async def partitions_of(bootstrap: str, topic: str) -> list[int]:
    """Partition ids of ``topic``; TopicMissing if it does not exist."""
    return (await partition_ids(bootstrap, [topic]))[topic]


async def partition_ids(bootstrap: str, topics: list[str]) -> dict[str, list[int]]:
    """Partition ids of each of ``topics`` from one admin client; TopicMissing naming
    the first that does not exist."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka_auth())
    try:
        # Inside: a start that fails has opened connections too.
        await admin.start()
        descs = await admin.describe_topics(topics)
    finally:
        await admin.close()
    found = {d["topic"]: d for d in descs}
    out = {}
    for topic in topics:
        desc = found.get(topic)
        if desc is None or desc["error_code"] != 0 or not desc["partitions"]:
            raise TopicMissing(topic)
        out[topic] = sorted(p["partition"] for p in desc["partitions"])
    return out
