"""Topics compressed with each codec Kafka has.

Market data compresses well, so an operator may well set ``compression.type`` on a
topic (the broker then recompresses every batch) or feed md.raw from a producer that
compresses. Every tickscale reader must be able to read such batches: a handler
that cannot decompress one fetches it again and again and its partitions stop.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tests.pipeline_utils import HandlerProc, deadletters, run_replay, run_verify, summary
from tests.test_incarnation import DAY, ZERO
from tickscale.localstack.topics import MakeTopics, TopicSet


async def _compress(ts: TopicSet, codecs: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=ts.bootstrap)
    await admin.start()
    try:
        await admin.alter_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, topic, {"compression.type": codec})
                for topic, codec in codecs.items()
            ]
        )
    finally:
        await admin.close()


@pytest.mark.slow
async def test_a_day_through_topics_compressed_with_zstd_lz4_and_snappy(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    ts = await make_topics(raw_partitions=2)
    await _compress(ts, {ts.raw: "zstd", ts.ticks: "lz4", ts.deadletter: "snappy"})
    manifest = tmp_path / "day.json"
    h = HandlerProc(ts, tmp_path, "a")
    try:
        run_replay(ts, manifest, "--symbols", "6", "--seed", "3", "--date", DAY,
                   "--from", "09:28", "--to", "09:31", "--speed", "max",
                   "--malformed-every", "150")  # fmt: skip
        rc, out = run_verify(ts, manifest)
        assert summary(out) == ZERO, out[-3000:] + h.log()[-3000:]
        assert rc == 0, out[-3000:]
        n, expected = deadletters(out)
        assert n == expected > 0, out[-3000:]
        assert "fetch failed" not in h.log(), h.log()[-3000:]
    finally:
        h.close()
