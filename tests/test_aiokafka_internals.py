"""The one module that reaches past aiokafka's public API answers to its version."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiokafka
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from core import aiokafka_internals as ai
from core.aiokafka_internals import FencedProducer, check_version
from tests.conftest import MakeTopics
from tickscale.localstack.topics import delete_topics, list_topics


def test_the_installed_aiokafka_is_the_release_the_module_was_written_for() -> None:
    # Fails as soon as another release is installed: review core/aiokafka_internals.py
    # (protocol definitions, private attributes, log text) before moving the pin.
    assert aiokafka.__version__.startswith(ai.SUPPORTED), aiokafka.__version__
    check_version()


def test_another_release_is_refused_before_anything_private_is_touched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aiokafka, "__version__", "0.15.0")
    with pytest.raises(RuntimeError, match=r"aiokafka 0\.15\.0 is installed"):
        check_version()
    with pytest.raises(RuntimeError, match=r"review the module and its pin"):
        FencedProducer(bootstrap_servers="127.0.0.1:1", transactional_id="t")
    # Every entry point checks first: the object handed in is never looked at.
    nothing: Any = object()
    tp = TopicPartition("t", 0)
    calls = [
        lambda: ai.leave_group_now(nothing),
        lambda: ai.fetch_offset(nothing, "g", tp, True),
        lambda: ai.open_transactions(nothing, "p"),
        lambda: ai.member_client_ids(nothing, "g"),
        lambda: ai.raw_topic_id(nothing, "t"),
        lambda: ai.delete_group(nothing, "g"),
        lambda: ai.stop_consumer(nothing),
        lambda: ai.stop_producer(nothing, 1.0),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"review the module and its pin"):
            asyncio.run(call())
    with pytest.raises(RuntimeError, match=r"review the module and its pin"):
        ai.GroupMetadata.of(nothing, "g")


def test_no_other_module_reaches_into_aiokafka() -> None:
    """aiokafka's protocol layer and its clients' private attributes appear nowhere else:
    a new use belongs in core/aiokafka_internals.py, under its version check."""
    layer = re.compile(r"aiokafka\.(protocol|producer\.sender|client|conn)\b")
    private = re.compile(
        r"\b(?!self\b)\w+\._(client|coordinator|fetcher|sender|txn_manager|transaction_waiter"
        r"|send_request_to_node|send_request|find_coordinator)\b"
    )
    root = Path(__file__).resolve().parent.parent
    own = {"core/aiokafka_internals.py", "tests/test_aiokafka_internals.py"}
    found = []
    for d in ("core", "ingest", "scaler", "tickscale", "bench", "tests"):
        for path in sorted((root / d).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            text = path.read_text()
            if rel in own or "aiokafka" not in text:
                continue
            for n, line in enumerate(text.splitlines(), 1):
                if layer.search(line) or private.search(line):
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


async def _stuck_producer(bootstrap: str, topic: str) -> tuple[AIOKafkaProducer, Any]:
    """A transactional producer holding a batch for ``topic``, deleted under it: the batch
    waits for its partition to join the transaction, which never happens."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"stuck-{topic}")
    await p.start()
    await p.partitions_for(topic)  # the partitions are known: the send does not wait
    await delete_topics(bootstrap, [topic])
    async with asyncio.timeout(30):  # deletion is asynchronous
        while topic in await list_topics(bootstrap):
            await asyncio.sleep(0.2)
    await p.begin_transaction()
    b = p.create_batch()
    b.append(key=None, value=b"x", timestamp=None)
    fut = await p.send_batch(b, topic, partition=0)
    return p, fut


async def test_a_producer_stuck_on_a_deleted_topic_is_stopped_within_its_limit(
    make_topics: MakeTopics,
) -> None:
    ts = await make_topics(raw_partitions=1)
    p, fut = await _stuck_producer(ts.bootstrap, ts.raw)
    t0 = time.monotonic()
    await ai.stop_producer(p, 2.0)
    assert time.monotonic() - t0 < 10
    # The sender is gone, not left retrying; the batch failed, and says why.
    assert p._sender.sender_task.done()
    assert fut.done() and "closed with this batch unsent" in str(fut.exception())


async def test_the_library_alone_leaves_that_producers_sender_running(
    make_topics: MakeTopics,
) -> None:
    """Why stop_producer exists: a stop() cut short leaves the sender retrying. Once a
    release closes such a producer itself, this fails: review stop_producer then."""
    ts = await make_topics(raw_partitions=1)
    p, fut = await _stuck_producer(ts.bootstrap, ts.raw)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(p.stop(), 2.0)
    await asyncio.sleep(0.5)
    assert not p._sender.sender_task.done() and not fut.done()
    await ai.stop_producer(p, 0.1)  # and it ends it
    assert p._sender.sender_task.done()
