"""A topic missing from the cluster's metadata: one line a minute, not a flood.

A topic deleted under a running client makes aiokafka log an ERROR at each metadata
refresh for as long as it is gone: twice a second in the handler's producer, thousands a
second in a consumer reading it (verify logged 15,000 lines in 8 s). Each process that
reads or writes topics others may delete (handler, replay, verify) installs this filter;
what the process does about the missing topic it says itself.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from core.aiokafka_internals import CLUSTER_LOGGER, TOPIC_NOT_FOUND_MSG


class MissingTopics(logging.Filter):
    """A filter for the cluster metadata's logger: per topic, the first "not found" line
    and then one a minute. One per process (``MISSING_TOPICS``): the logger is the
    process's."""

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


MISSING_TOPICS = MissingTopics()
