"""The topics the pipeline needs, with the settings each one's role calls for."""

from __future__ import annotations

from tickscale import constants as c
from tickscale.localstack.topics import ensure_topics

# md.raw must keep a whole day: a partition restored without a snapshot is
# rebuilt by replaying it from the start.
RAW_CONFIG = {"retention.ms": str(7 * 24 * 3600 * 1000), "max.message.bytes": "1048576"}
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
