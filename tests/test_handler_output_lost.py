"""A ticks topic deleted under a running handler: said once, held, carried on when back.

The real ``tickscale handler`` process against the real broker. While the topic it writes
to is gone, each batch fails and is aborted (nothing is committed, so nothing is lost) and
the client would log an ERROR at every metadata refresh; the handler says it once.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.pipeline_utils import HandlerProc, run_replay, run_verify, summary
from tickscale.localstack.topics import TopicSet, delete_topics, ensure_topics, list_topics

pytestmark = pytest.mark.slow

WINDOW = ["--source", "synthetic", "--symbols", "3", "--seed", "4", "--date", "2024-11-25"]


def _ticks_out(h: HandlerProc) -> float:
    return h.metric("tickscale_handler_ticks_out_total")


def _status(h: HandlerProc, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{h.port}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


async def _until(what: str, ok: object, h: HandlerProc, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not ok():  # type: ignore[operator]
        assert h.proc.poll() is None, h.log()
        assert time.monotonic() < deadline, f"{what}\n{h.log()}"
        await asyncio.sleep(0.3)


def _aborts(h: HandlerProc) -> float:
    return h.metric("tickscale_handler_transaction_aborts_total")


async def _held(h: HandlerProc, topic: str, for_s: float) -> str:
    """The handler says ``topic`` is missing, its commit fails once, and then nothing is
    aborted for ``for_s`` seconds: it holds its input. Its log."""
    said = f"topic {topic} is not on the broker (deleted?)"
    # A stalled commit is checked within seconds, long before its transaction times out.
    await _until("the missing topic not said within 25 s", lambda: said in h.log(), h, 25)
    await _until("the failed commit not counted", lambda: _aborts(h) > 0, h, 10)
    aborts = _aborts(h)
    await asyncio.sleep(for_s)
    text = h.log_path.read_text(errors="replace")
    assert _aborts(h) == aborts, text[-3000:]
    assert text.count(said) == 1, text[-3000:]
    return text


async def test_a_deleted_ticks_topic_is_said_once_and_carried_on_when_back(
    topics: TopicSet, tmp_path: Path
) -> None:
    # The default transaction timeout (60 s): the handler must not need it to notice. From
    # the second failure at an offset, records would be committed one at a time: one that
    # makes no tick would then commit without the missing topic, which must not be
    # mistaken for its return.
    h = HandlerProc(topics, tmp_path, "lost", extra=["--poison-after", "2"])
    try:
        await asyncio.to_thread(h.wait_ready)
        args = [*WINDOW, "--speed", "max"]
        await asyncio.to_thread(
            run_replay, topics, tmp_path / "a.json", *args, "--from", "09:29", "--to", "09:33"
        )
        await _until("no ticks out", lambda: _ticks_out(h) > 0, h)
        await delete_topics(topics.bootstrap, [topics.ticks])
        async with asyncio.timeout(30):  # deletion is asynchronous
            while topics.ticks in await list_topics(topics.bootstrap):
                await asyncio.sleep(0.2)
        # More input while the topic is gone: the handler must hold it, not skip it.
        await asyncio.to_thread(
            run_replay, topics, tmp_path / "b.json", *args, "--from", "09:33", "--to", "09:36"
        )
        held = _ticks_out(h)
        # Held: no transaction is begun while the topic is gone (before, one was begun,
        # spun on the missing topic until its timeout and was aborted, over and over),
        # and the client's error about the missing topic is never logged.
        text = await _held(h, topics.ticks, 40)
        assert "not found in cluster metadata" not in text, text[-3000:]
        assert f"topic {topics.ticks} is back" not in text, text[-3000:]
        assert "Traceback" not in text and h.proc.poll() is None, text[-3000:]
        assert _ticks_out(h) == held  # nothing is counted out while nothing can be written
        # Alive (a restart would not help) but not ready: the fleet cannot deliver.
        assert _status(h, "/healthz") == 200
        assert _status(h, "/readyz") == 503

        await ensure_topics(topics.bootstrap, {topics.ticks: topics.ticks_partitions})
        back = f"topic {topics.ticks} is back"
        await _until("its return not said within 20 s", lambda: back in h.log(), h, 20)
        await _until("no ticks after the topic came back", lambda: _ticks_out(h) > held, h)
        assert _status(h, "/readyz") == 200
        # The producer given up was fenced by its successor: its unsent batches failed
        # then, with no traceback for it.
        text = h.log()
        assert "Traceback" not in text and "never retrieved" not in text, text[-3000:]
    finally:
        h.close()


async def test_a_deleted_dead_letter_topic_holds_the_input_once_a_dead_letter_waits(
    topics: TopicSet, tmp_path: Path
) -> None:
    """Batches without dead letters do not need the topic and commit; the first with one
    fails on it, and every poll after fetches that record again. So the input is held, as
    for the ticks topic, until the topic is back (before, each retry began a transaction
    that failed on it and was aborted, over and over), and nothing is lost."""
    h = HandlerProc(topics, tmp_path, "dl", extra=["--poison-after", "2"])
    try:
        await asyncio.to_thread(h.wait_ready)
        await delete_topics(topics.bootstrap, [topics.deadletter])
        async with asyncio.timeout(30):
            while topics.deadletter in await list_topics(topics.bootstrap):
                await asyncio.sleep(0.2)
        manifest = tmp_path / "day.json"
        await asyncio.to_thread(
            run_replay, topics, manifest, *WINDOW, "--speed", "max", "--from", "09:29",
            "--to", "09:34", "--malformed-every", "700",
        )  # fmt: skip
        await _held(h, topics.deadletter, 30)
        assert _status(h, "/readyz") == 503

        await ensure_topics(topics.bootstrap, {topics.deadletter: topics.deadletter_partitions})
        back = f"topic {topics.deadletter} is back"
        await _until("its return not said within 20 s", lambda: back in h.log(), h, 20)
        # Every tick and every dead letter of the day, once.
        rc, out = await asyncio.to_thread(run_verify, topics, manifest)
        assert rc == 0 and summary(out)["missing"] == 0, out[-3000:]
        assert "Traceback" not in h.log_path.read_text(errors="replace")
    finally:
        h.close()
