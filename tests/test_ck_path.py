"""The candidate confluent-kafka data path publishes every tick exactly once, from
plain and from packed raw records, on a real broker."""

from __future__ import annotations

import asyncio
import threading
import time

import orjson
import pytest
from confluent_kafka import Consumer

from bench.ck_bench import pack_topic
from ingest.handler.ck_path import CkPath, CkSettings
from ingest.replay.publisher import Replayer
from ingest.replay.source import ItchWindow, parse_hhmm
from ingest.replay.synthetic import SyntheticDay
from ingest.ticks import SymbolLedger
from tickscale.localstack.topics import MakeTopics, TopicSet, ensure_topics

DAY = "2024-11-25"


def _read_all(bootstrap: str, topic: str) -> list[bytes]:
    """Every committed record of ``topic``, read until 3 s pass without one."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{topic}",
                  "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                  "enable.auto.commit": False})  # fmt: skip
    c.subscribe([topic])
    out: list[bytes] = []
    quiet = time.monotonic()
    try:
        while time.monotonic() - quiet < 3.0:
            for m in c.consume(1000, 0.5):
                if m.error() is None:
                    out.append(m.value() or b"")
                    quiet = time.monotonic()
    finally:
        c.close()
    return out


def _run_path(ts: TopicSet, in_topic: str, records: int) -> None:
    s = CkSettings(
        ts.bootstrap, in_topic, ts.ticks, ts.ticks_partitions, ts.deadletter,
        f"{ts.prefix}-g-{in_topic}", f"{ts.prefix}-txn-{in_topic}", batch=500,
    )  # fmt: skip
    path = CkPath(s)
    stop = threading.Event()
    t = threading.Thread(target=path.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 60
        while path.records < records and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.1)
    finally:
        stop.set()
        t.join(30)
    assert path.records == records


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True])
async def test_every_tick_once(make_topics: MakeTopics, packed: bool) -> None:
    ts = await make_topics(raw_partitions=2)
    src = ItchWindow(SyntheticDay(4, 42), parse_hhmm("09:30"), parse_hhmm("09:31"))
    m = await Replayer(ts.bootstrap, ts.raw, src, None, DAY).run()
    in_topic, records = ts.raw, m.records_sent
    if packed:
        in_topic = f"{ts.raw}.packed"
        await ensure_topics(ts.bootstrap, {in_topic: 2})
        ts.names.append(in_topic)
        records, messages = await asyncio.to_thread(pack_topic, ts.bootstrap, ts.raw, in_topic,
                                                    2, 16)  # fmt: skip
        assert messages == m.records_sent and records < messages
    await asyncio.to_thread(_run_path, ts, in_topic, records)

    ledgers: dict[str, SymbolLedger] = {}
    for v in await asyncio.to_thread(_read_all, ts.bootstrap, ts.ticks):
        t = orjson.loads(v)
        ledgers.setdefault(t["symbol"], SymbolLedger()).add(t)
    expected = {s: e for s, e in m.symbols.items() if e.ticks}
    assert expected
    assert {s: (lg.count, lg.checksum) for s, lg in ledgers.items()} == {
        s: (e.ticks, e.checksum) for s, e in expected.items()
    }
    assert await asyncio.to_thread(_read_all, ts.bootstrap, ts.deadletter) == []
