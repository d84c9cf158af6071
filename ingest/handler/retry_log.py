"""The producer's retried produce errors: counted in a metric, reported once a minute.

aiokafka logs a WARNING for every produce it retries. With transactions one of
those is routine: a produce sent right after the previous commit races its
commit markers, and the broker answers NOT_ENOUGH_REPLICAS until they are
written (transaction verification). A handler at 25,000 msg/s logged 4-8 of
those a second, a flood that hides the warnings that matter. Every retry is
still counted, per error, and the first one and then one summary a minute
reach the log.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from core.aiokafka_internals import PRODUCE_RETRY_MSG, SENDER_LOGGER
from core.client_log import SUMMARY_ATTR
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
        setattr(record, SUMMARY_ATTR, True)
        self._since.clear()
        self._last = now
        return True


PRODUCE_RETRIES = ProduceRetries()
