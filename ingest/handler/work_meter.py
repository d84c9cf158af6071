"""What a handler reports for the scaler's capacity model (``RedisSink.stats``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from ingest import metrics


class WorkMeter:
    """Messages, and the busy seconds of the batches that carried them, split in two:
    CPU (grows with the messages) and waits on the broker (grows with the batches), the
    two parts the scaler's capacity model separates."""

    def __init__(self) -> None:
        self.messages = 0
        self.busy_s = 0.0
        self.cpu_s = 0.0
        self.batches = 0

    @contextlib.asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        """Counts one batch's time; a batch that raised is not counted. (Asynchronous only
        to sit in one ``async with`` beside the lock it is taken under.)"""
        t0, c0 = time.monotonic(), time.process_time()
        yield
        dt = time.monotonic() - t0
        self.busy_s += dt
        self.cpu_s += time.process_time() - c0
        self.batches += 1
        metrics.BUSY.inc(dt)
