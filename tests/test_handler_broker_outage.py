"""A broker outage under a running handler: ridden out, nothing lost, and said in a few
lines rather than thousands.

The real ``tickscale handler`` and ``tickscale replay`` processes against the session's
real broker, which is stopped for 30 s in the middle of the replay and started again on
the same port and data.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.pipeline_utils import HandlerProc, run_verify, start_replay, summary
from tickscale.localstack import KafkaBroker
from tickscale.localstack.topics import TopicSet

pytestmark = pytest.mark.slow

# About 40 s at ten times the market's pace: the outage falls inside it.
REPLAY = [
    "--source", "synthetic", "--symbols", "3", "--seed", "4", "--date", "2024-11-25",
    "--from", "09:29", "--to", "09:36", "--speed", "10",
]  # fmt: skip
CLIENT_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR) (aiokafka\S*): (.*)$")


def _client_lines(text: str) -> Counter[tuple[str, str]]:
    """The client's warnings and errors, by logger and message with the numbers blanked."""
    kinds: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        m = CLIENT_LINE.match(line)
        if m:
            kinds[(m.group(2), re.sub(r"\d+", "N", m.group(3))[:60])] += 1
    return kinds


async def test_a_broker_outage_is_ridden_out_in_a_few_lines(
    topics: TopicSet, kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    h = HandlerProc(topics, tmp_path, "outage")
    manifest = tmp_path / "day.json"
    replay = None
    try:
        await asyncio.to_thread(h.wait_ready)
        replay = start_replay(topics, manifest, tmp_path / "replay.log", *REPLAY)
        deadline = time.monotonic() + 60
        while h.metric("tickscale_handler_ticks_out_total") == 0:
            assert time.monotonic() < deadline, h.log()
            await asyncio.sleep(0.3)
        await asyncio.to_thread(kafka_broker.stop)
        await asyncio.sleep(30)
        await asyncio.to_thread(kafka_broker.start)
        before = h.metric("tickscale_handler_ticks_out_total")
        deadline = time.monotonic() + 60
        while h.metric("tickscale_handler_ticks_out_total") == before:
            assert time.monotonic() < deadline, f"no ticks after the outage\n{h.log()}"
            await asyncio.sleep(0.3)
        assert await asyncio.to_thread(replay.wait, 180) == 0
        code, out = await asyncio.to_thread(run_verify, topics, manifest)
        assert code == 0, out
        assert summary(out)["missing"] == 0, out

        text = h.log_path.read_text(errors="replace")
        kinds = _client_lines(text)
        # The client logs each failed connection, metadata, fetch and coordinator request
        # every retry backoff: about 80 lines a second before. Each kind is now logged once,
        # then at most once a minute (a slow broker start can make that one more), and once
        # more with the count when it has gone quiet.
        assert kinds, "the outage left no trace in the log"
        assert max(kinds.values()) <= 4, kinds.most_common(5)
        assert sum(kinds.values()) <= 50, kinds.most_common(10)
        # ... and once the broker is back, how many were left out: the outage's last line.
        assert "more like it left out, the last" in text, text[-3000:]
        assert "Traceback" not in text and h.proc.poll() is None, text[-3000:]
    finally:
        if replay is not None and replay.poll() is None:
            replay.kill()
        h.close()
