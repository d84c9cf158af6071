"""What a resumed replay need not send again: records of the earlier run that
reached the broker after its manifest was written."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

from core.aiokafka_internals import stop_consumer
from core.constants import HDR_SEQ
from core.incarnation import topic_id
from core.secrets import kafka_auth
from ingest.codecs.errors import SourceError
from ingest.manifest import Manifest

log = logging.getLogger(__name__)


async def topic_incarnation(bootstrap: str, topic: str) -> str | None:
    """The topic's id (None where the broker gives none): the manifest keeps it, so a
    resume tells the topic its run sent to from one deleted and created again since."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, **kafka_auth(), enable_auto_commit=False, group_id=None
    )
    try:
        # Started inside: a start cut short (a broker away, a deadline) is closed too.
        await consumer.start()
        return await topic_id(consumer, topic)
    finally:
        await stop_consumer(consumer)


async def log_ends(bootstrap: str, topic: str, partitions: int) -> list[int]:
    """Each partition's log end: where a replay beginning now puts its first record."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, **kafka_auth(), enable_auto_commit=False, group_id=None
    )
    try:
        await consumer.start()
        ends = await consumer.end_offsets(tps)
        return [ends[tp] for tp in tps]
    finally:
        await stop_consumer(consumer)


def check_incarnation(prev: Manifest, topic: str, now: str | None) -> None:
    """SourceError unless ``topic`` is still the topic the resumed run (``prev``) sent to."""
    if prev.topic_id and now and prev.topic_id != now:
        raise SourceError(
            f"--topic {topic}",
            f"was deleted and created again since the resumed replay sent to it (topic id "
            f"{prev.topic_id} then, {now} now), so what it sent is gone: replay the day "
            "again without --resume, after removing its manifest",
        )


async def landed_after(bootstrap: str, topic: str, partitions: int, prev: Manifest) -> list[int]:
    """Records of each partition that reached the broker after ``prev`` was written.

    The run that wrote ``prev`` may have stopped with records sent and not yet
    acknowledged, or acknowledged since its last checkpoint. They carry the feed
    sequence numbers that follow the manifest's, timestamps from after it, and
    offsets past the log ends the replay began at (where the manifest keeps them).
    """
    n = partitions
    seqs = prev.partition_seqs or [0] * n
    landed = [0] * n
    if not prev.acked_at_ms:
        return landed
    # Timestamps are this machine's (create time) or the broker's (append time):
    # a margin for the broker's clock. What it adds is numbered up to the
    # manifest's and not counted.
    since = prev.acked_at_ms - 60_000
    tps = [TopicPartition(topic, p) for p in range(n)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, **kafka_auth(), enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        starts = await consumer.offsets_for_times({tp: since for tp in tps})
        ends = await consumer.end_offsets(tps)
        todo: dict[TopicPartition, int] = {}
        for tp in tps:
            at = starts.get(tp)
            if at is None:
                continue
            first = max(at.offset, prev.start_offsets[tp.partition] if prev.start_offsets else 0)
            if first < ends[tp]:
                consumer.seek(tp, first)
                todo[tp] = ends[tp]
        while todo:
            batch = await consumer.getmany(*todo, timeout_ms=1000)
            for tp, records in batch.items():
                p = tp.partition
                for r in records:
                    seq = dict(r.headers).get(HDR_SEQ)
                    if seq is not None and seq.isdigit():
                        if int(seq) == seqs[p] + landed[p] + 1:
                            landed[p] += 1
            for tp in list(todo):
                if await consumer.position(tp) >= todo[tp]:
                    del todo[tp]
    finally:
        await stop_consumer(consumer)
    if any(landed):
        log.info("resume: %d records already on the broker are not sent again", sum(landed))
    return landed
