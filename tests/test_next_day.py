"""One trading day after another through the same topics and the same running handler,
as a fleet that is not restarted each night runs: each day must verify on its own.

Real handler process and the real broker.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka import TopicPartition

from tests.pipeline_utils import HandlerProc, deadletters, run_replay, run_verify, summary
from tests.test_incarnation import ZERO
from tickscale.localstack.topics import MakeTopics, TopicSet

DAYS = ("2024-11-25", "2024-11-26")


def _replay(ts: TopicSet, manifest: Path, day: str) -> None:
    # The same seed both days: the same symbols and the same order references, as a real
    # venue reuses them, so state carried over from the day before collides with today's.
    run_replay(ts, manifest, "--symbols", "6", "--seed", "3", "--date", day,
               "--from", "09:28", "--to", "09:31", "--speed", "max",
               "--malformed-every", "150")  # fmt: skip


def _assert_day_exact(ts: TopicSet, manifest: Path, h: HandlerProc) -> str:
    rc, out = run_verify(ts, manifest, timeout_s=60)
    assert summary(out) == ZERO, out[-3000:] + h.log()[-2000:]
    n, expected = deadletters(out)
    assert n == expected > 0, out[-3000:]
    assert rc == 0, out[-3000:]
    return out


@pytest.mark.slow
async def test_each_day_through_the_same_topics_and_handler_verifies_on_its_own(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    ts = await make_topics(raw_partitions=2)
    first, second = (tmp_path / f"{d}.json" for d in DAYS)
    h = HandlerProc(ts, tmp_path, "a")
    try:
        _replay(ts, first, DAYS[0])
        out = _assert_day_exact(ts, first, h)
        assert "other_days" not in out, out[-3000:]
        _replay(ts, second, DAYS[1])
        out = _assert_day_exact(ts, second, h)
        # The topic holds both days; each verify judges only its own.
        assert " other_days=" in out, out[-3000:]
        for p in range(ts.raw_partitions):
            said = f"{TopicPartition(ts.raw, p)}: trading day {DAYS[1]} begins"
            assert said in h.log_path.read_text(errors="replace"), h.log()
        _assert_day_exact(ts, first, h)
        assert h.proc.poll() is None
    finally:
        h.close()
