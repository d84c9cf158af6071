"""The replay publisher against the real broker: every record, in order, once."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord

from core.constants import HDR_BROADCAST, HDR_SEQ
from ingest.keys import partition_for
from ingest.replay.publisher import Replayer
from ingest.replay.source import ItchWindow, RawMessage, parse_hhmm
from ingest.replay.synthetic import SyntheticDay
from tickscale.localstack.topics import MakeTopics

DAY = "2024-11-25"


async def _read_all(bootstrap: str, topic: str, n: int) -> list[ConsumerRecord[bytes, bytes]]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    got: list[ConsumerRecord[bytes, bytes]] = []
    try:
        async with asyncio.timeout(60):
            while len(got) < n:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(records)
    finally:
        await consumer.stop()
    return got


@pytest.mark.parametrize("speed", [None, 600.0], ids=["max", "paced"])
async def test_every_record_in_order_once(
    make_topics: MakeTopics, speed: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches of 2 KB fill every few dozen records, so the full-batch path runs
    # constantly next to the timed flushes.
    monkeypatch.setattr(Replayer, "batch_bytes", 2048)
    topics = await make_topics(raw_partitions=3)
    src: list[RawMessage] = list(
        ItchWindow(SyntheticDay(6, 3), parse_hhmm("09:29"), parse_hhmm("09:31"))
    )
    r = Replayer(topics.bootstrap, topics.raw, src, speed, DAY)
    m = await r.run()
    expected: dict[int, list[bytes]] = defaultdict(list)
    for msg in src:
        targets = range(3) if msg.key is None else (partition_for(msg.key, 3),)
        for p in targets:
            expected[p].append(msg.payload)
    assert m.records_sent == sum(len(v) for v in expected.values())

    got = await _read_all(topics.bootstrap, topics.raw, m.records_sent)
    assert len(got) == m.records_sent
    by_part: dict[int, list[ConsumerRecord[bytes, bytes]]] = defaultdict(list)
    for rec in got:
        by_part[rec.partition].append(rec)
    for p, records in by_part.items():
        records.sort(key=lambda rec: rec.offset)
        assert [rec.value for rec in records] == expected[p]
        headers = [dict(rec.headers) for rec in records]
        assert [int(h[HDR_SEQ]) for h in headers] == list(range(1, len(records) + 1))
        broadcast = sum(1 for h in headers if h.get(HDR_BROADCAST) == b"1")
        assert broadcast == sum(1 for msg in src if msg.key is None)
