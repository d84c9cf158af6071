"""The topics the pipeline needs, with the settings each one's role calls for."""

from __future__ import annotations

from tickscale import constants as c
from tickscale.localstack.topics import ensure_topics

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


async def create_topics(
    bootstrap: str,
    raw_partitions: int,
    ticks_partitions: int,
    replication: int = 1,
    raw: str = c.RAW_TOPIC,
    ticks: str = c.TICKS_TOPIC,
    deadletter: str = c.DEADLETTER_TOPIC,
) -> None:
    """Create the raw, tick and dead-letter topics if missing (idempotent)."""
    await ensure_topics(bootstrap, {raw: raw_partitions}, replication, RAW_CONFIG)
    await ensure_topics(bootstrap, {ticks: ticks_partitions}, replication, TICKS_CONFIG)
    await ensure_topics(bootstrap, {deadletter: 1}, replication, TICKS_CONFIG)


async def partitions_of(bootstrap: str, topic: str) -> list[int]:
    """Partition ids of ``topic``; RuntimeError naming the topic if it does not exist."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (desc,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if desc["error_code"] != 0 or not desc["partitions"]:
        raise RuntimeError(f"topic {topic!r} does not exist")
    return sorted(p["partition"] for p in desc["partitions"])
