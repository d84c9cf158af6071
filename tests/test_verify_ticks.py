"""What verify finds in the tick topic that is not a tick: counted, never a traceback."""

from __future__ import annotations

from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from ingest.manifest import Manifest
from tests.pipeline_utils import run_verify
from tickscale.localstack.topics import MakeTopics


async def test_records_of_the_tick_topic_that_are_not_ticks_are_counted_and_fail_the_ledger(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    ts = await make_topics(raw_partitions=1)
    tick = {"v": 1, "kind": "trade", "symbol": "A", "seq": 1, "event_ts": 1, "recv_ts": 1}
    junk = [b"x", b"[]", b'{"symbol":"A"}', orjson.dumps(tick | {"seq": 2**40}), b""]
    p = AIOKafkaProducer(bootstrap_servers=ts.bootstrap)
    await p.start()
    try:
        for value in junk:
            await p.send_and_wait(ts.ticks, value, key=b"A")
    finally:
        await p.stop()
    manifest = tmp_path / "m.json"
    Manifest(source="jsonl", topic=ts.raw, partitions=1).write(manifest)
    rc, out = run_verify(ts, manifest, timeout_s=0)
    assert "Traceback" not in out, out
    assert f"unreadable={len(junk)}" in out, out
    assert rc == 1, out
