"""The raw topic deleted and created again under a running handler."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.pipeline_utils import HandlerProc, run_verify
from tests.test_incarnation import _assert_exact, _day, _recreate, _topic_id
from tickscale.localstack.topics import MakeTopics

pytestmark = pytest.mark.slow


async def test_a_running_handler_follows_the_topic_into_its_new_incarnation(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    ts = await make_topics(raw_partitions=2)
    old = tmp_path / "old.json"
    _day(ts, old, 3, "09:28", "09:34")
    old_id = await _topic_id(ts)
    a = HandlerProc(ts, tmp_path, "a")
    try:
        _assert_exact(*run_verify(ts, old))
        await _recreate(ts)
        assert await _topic_id(ts) != old_id
        new = tmp_path / "new.json"
        _day(ts, new, 5, "09:28", "09:40")  # a bigger day: the old positions lie within it
        _assert_exact(*run_verify(ts, new))
        assert a.proc.poll() is None
    finally:
        a.close()


async def test_a_handler_that_never_saw_the_topic_missing_follows_it_too(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    """Recreated while the handler was not looking (stopped, within its session), so the
    group never saw the topic missing and nobody rebalanced: the handler must not read the
    new log on from the old one's positions with the old day's books."""
    ts = await make_topics(raw_partitions=2)
    old = tmp_path / "old.json"
    _day(ts, old, 3, "09:28", "09:34")
    a = HandlerProc(ts, tmp_path, "a", extra=["--session-timeout-ms", "60000"])
    try:
        _assert_exact(*run_verify(ts, old))
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            await _recreate(ts)
            new = tmp_path / "new.json"
            _day(ts, new, 5, "09:28", "09:40")
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        _assert_exact(*run_verify(ts, new))
        assert a.proc.poll() is None
    finally:
        a.close()
