"""The handler bench's feed yields the CPU in its own thread only."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from bench.bench_handler import DAY, run_feed
from core.topology import RAW_CONFIG
from ingest.replay.publisher import Replayer
from ingest.replay.source import ItchWindow, parse_hhmm
from ingest.replay.synthetic import SyntheticDay
from tickscale.localstack import delete_topics, ensure_topics


def _own_niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_the_feed_thread_alone_runs_niced(kafka_bootstrap: str) -> None:
    # Synchronous: the feed runs its own event loop in a worker thread, as in the bench.
    topic = f"t-bench-feed-{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topics(kafka_bootstrap, {topic: 2}, configs=RAW_CONFIG))
    try:
        src = list(ItchWindow(SyntheticDay(3, 1), parse_hhmm("11:00"), parse_hhmm("11:01")))
        base = _own_niceness()
        with ThreadPoolExecutor(max_workers=1) as pool:
            r = Replayer(kafka_bootstrap, topic, src, None, DAY, manifest=False)
            m = pool.submit(run_feed, r, 7).result(timeout=120)
            # The same worker thread: the feed ran at the niceness it was given.
            assert pool.submit(_own_niceness).result() == base + 7
        assert m.records_sent >= len(src) > 0
        # Not the process: this thread, and every child it starts (the broker,
        # the handlers), keep their niceness.
        assert _own_niceness() == base
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(os.nice(0))"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert int(child.stdout) == base
    finally:
        asyncio.run(delete_topics(kafka_bootstrap, [topic]))
