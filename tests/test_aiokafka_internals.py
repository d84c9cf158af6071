"""The one module that reaches past aiokafka's public API answers to its version."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiokafka
import pytest
from aiokafka import TopicPartition

from core import aiokafka_internals as ai
from core.aiokafka_internals import FencedProducer, check_version


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
