"""How the handler reads its input: its group consumer, the poll's top-up, and
the topics it checks at start."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError

from core.reach import reach_topics
from core.secrets import kafka_auth
from ingest import metrics
from ingest.handler.settings import HandlerSettings

log = logging.getLogger(__name__)

Batches = dict[TopicPartition, list[Any]]


METADATA_MAX_AGE_MS = 5_000


def group_consumer(s: HandlerSettings) -> AIOKafkaConsumer:
    """The handler's member of the group: reads committed records only, commits nothing
    itself (the transactions carry the offsets)."""
    return AIOKafkaConsumer(
        bootstrap_servers=s.bootstrap,
        **kafka_auth(),
        group_id=s.group,
        client_id=s.handler_id,
        enable_auto_commit=False,
        # Never reset silently: a position that fell out of the log (its records
        # deleted by retention before they were processed) is a hole in the day,
        # which move_into_log() says and counts.
        auto_offset_reset="none",
        isolation_level="read_committed",
        max_poll_records=s.max_batch,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_wait_ms=s.poll_timeout_ms,
        session_timeout_ms=s.session_timeout_ms,
        heartbeat_interval_ms=s.heartbeat_interval_ms,
        # Restores can replay many records inside the assignment callback.
        rebalance_timeout_ms=120_000,
        max_poll_interval_ms=300_000,
        # The group sees a topic's partitions change only at a metadata refresh: every
        # 5 minutes by default. Partitions added to md.raw, or md.raw deleted and created
        # again (which leaves the group with no partitions while it is gone), would wait
        # that long to be consumed; a metadata request every 5 s costs nothing here.
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )


async def out_partitions(s: HandlerSettings) -> int:
    """The output topic's partition count, once the broker answers and the handler's three
    topics are there. Waits up to ``connect_timeout_s`` for both; then BrokerUnreachable,
    or TopicMissing naming a topic still not there."""
    topics = [s.in_topic, s.out_topic, s.deadletter_topic]
    found = await reach_topics(s.bootstrap, topics, s.connect_timeout_s, wait_for_topics=True)
    return len(found[s.out_topic])


async def move_into_log(consumer: AIOKafkaConsumer, positions: dict[TopicPartition, int]) -> None:
    """Seek partitions whose fetch position lies outside their log to its start.

    Below the log start, the records up to it were deleted (retention, or by hand)
    before the group processed them: their ticks can never be made, so the hole is
    said and counted. Beyond the log end, the topic was deleted and created again (the
    next commit sees its new id and restores every partition) or its log truncated:
    reading from the start is what the consumer did before.
    """
    # An error can be stale: the fetcher sends its first fetch from the committed
    # offset while the assignment's restore is still choosing the start, and the
    # restore's seek wins. Only a position still at the refused offset is moved.
    positions = {tp: p for tp, p in positions.items() if await consumer.position(tp) == p}
    if not positions:
        return
    starts = await consumer.beginning_offsets(list(positions))
    for tp, pos in positions.items():
        start = starts[tp]
        if pos < start:
            metrics.RAW_DELETED.labels("before_processing").inc(start - pos)
            log.warning(
                "%s: offsets %d to %d were deleted from the log before the group processed "
                "them: %d records (retention, or deleted by hand), whose ticks are missing "
                "from the day; reading on from offset %d",
                tp, pos, start - 1, start - pos, start,
            )  # fmt: skip
        else:
            log.warning(
                "%s: offset %d lies beyond the log end (the topic deleted and created "
                "again, or its log truncated); reading from the log start %d",
                tp, pos, start,
            )  # fmt: skip
        consumer.seek(tp, start)


async def top_up(
    consumer: AIOKafkaConsumer,
    batches: Batches,
    max_batch: int,
    wait_ms: int,
    rebalances: Callable[[], int],
) -> Batches:
    """Add the records that reached the broker while ``batches`` sat in the buffer.

    The consumer sends no fetch to a broker while it holds unconsumed records
    of any partition that broker leads. So what a poll returns was fetched
    early in the previous batch and has waited a whole batch, and what
    arrived since is still on the broker. The poll emptied the buffer, which
    started a fetch at once; waiting for it (one round trip) takes those
    records into this batch instead of the one after.
    """
    room = max_batch - sum(len(r) for r in batches.values())
    if room <= 0:
        return batches
    seen = rebalances()
    try:
        more = await consumer.getmany(timeout_ms=wait_ms, max_records=room)
    except (OffsetOutOfRangeError, NoOffsetForPartitionError):
        # A position out of the log stays where it is, so the next poll meets it
        # again and moves it (move_into_log); a poll's records are never dropped here.
        more = {}
    except KafkaError as e:
        log.warning("fetch failed: %s", e)
        more = {}
    if rebalances() != seen:
        # The poll's records predate a rebalance (the wait can span one):
        # the partitions kept were moved back to their committed offsets
        # and are fetched again from there.
        return more
    for tp, recs in more.items():
        polled = batches.get(tp)
        if polled and recs[0].offset <= polled[-1].offset:
            # An assignment callback (a slow restore) can run while the poll
            # returns, and its seek fetches those records again: the poll's
            # copy is the stale one.
            batches[tp] = recs
        else:
            batches.setdefault(tp, []).extend(recs)
    return batches
