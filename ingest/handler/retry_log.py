"""The client's repeated lines, summarised: retried produce errors (counted in a metric,
reported once a minute) and a topic missing from the cluster's metadata.

aiokafka logs a WARNING for every produce it retries. With transactions one of
those is routine: a produce sent right after the previous commit races its
commit markers, and the broker answers NOT_ENOUGH_REPLICAS until they are
written (transaction verification). A handler at 25,000 msg/s logged 4-8 of
those a second, a flood that hides the warnings that matter. Every retry is
still counted, per error, and the first one and then one summary a minute
reach the log.

A topic the handler writes to, deleted under it, makes the client log an ERROR
at each metadata refresh, twice a second, for as long as it is gone. The
handler holds its input meanwhile (each batch fails, is aborted and retried,
and recovery.py says why), so this line comes once, and then once a minute.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from core.aiokafka_internals import (
    CLUSTER_LOGGER,
    PRODUCE_RETRY_MSG,
    SENDER_LOGGER,
    TOPIC_NOT_FOUND_MSG,
)
from ingest import metrics


def _error_name(err: object) -> str:
    return err.__name__ if isinstance(err, type) else type(err).__name__


class ProduceRetries(logging.Filter):
    """A filter for the sender's logger. One per process (``PRODUCE_RETRIES``): the
    logger is the process's, and two would count each retry twice."""

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._last: float | None = None
        self._since: Counter[str] = Counter()

    def install(self) -> None:
        logging.getLogger(SENDER_LOGGER).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != PRODUCE_RETRY_MSG or not isinstance(record.args, tuple):
            return True
        tp, err = record.args
        name = _error_name(err)
        metrics.PRODUCE_RETRIES.labels(name).inc()
        self._since[name] += 1
        now = self.clock()
        if self._last is not None and now - self._last < self.every_s:
            return False
        counts = ", ".join(f"{n} x{k}" for n, k in sorted(self._since.items()))
        record.msg = "produce retried (%s) since the last report; the latest on %s"
        record.args = (counts, tp)
        self._since.clear()
        self._last = now
        return True


class MissingTopics(logging.Filter):
    """A filter for the cluster metadata's logger: per topic, the first "not found" line
    and then one a minute, saying what the handler does meanwhile. One per process
    (``MISSING_TOPICS``), as for ``ProduceRetries``."""

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._since: Counter[str] = Counter()

    def install(self) -> None:
        logging.getLogger(CLUSTER_LOGGER).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != TOPIC_NOT_FOUND_MSG or not isinstance(record.args, tuple):
            return True
        topic = str(record.args[0])
        self._since[topic] += 1
        now = self.clock()
        last = self._last.get(topic)
        if last is not None and now - last < self.every_s:
            return False
        record.msg = (
            "the client finds no topic %s on the broker (%d metadata answers without it "
            "since the last report)"
        )
        record.args = (topic, self._since.pop(topic))
        self._last[topic] = now
        return True


PRODUCE_RETRIES = ProduceRetries()
MISSING_TOPICS = MissingTopics()
