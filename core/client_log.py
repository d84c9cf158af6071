"""The Kafka client's log lines that repeat: one line a minute, not a flood.

A topic deleted under a running client makes aiokafka log an ERROR at each metadata
refresh for as long as it is gone: twice a second in the handler's producer, thousands a
second in a consumer reading it (verify logged 15,000 lines in 8 s). Each process that
reads or writes topics others may delete (handler, replay, verify) installs this filter;
what the process does about the missing topic it says itself.

A broker that goes away does the same with every kind of client error: a handler logged
3,300 ERROR lines in a 40 s outage (connection refused, metadata, fetch and coordinator
requests failed, each every retry backoff), about 80 a second, and a fleet multiplies that.
Every process's log handler carries ``CLIENT_REPEATS`` (``CLIENT_REPEATS.handler``): each
kind of client warning or error is logged the first time, then at most once a minute with
the number left out.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TextIO

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
        setattr(record, SUMMARY_ATTR, True)
        self._last[topic] = now
        return True


MISSING_TOPICS = MissingTopics()


# Set on a record a filter above has already summarised: it passes ClientRepeats as is.
SUMMARY_ATTR = "tickscale_summary"
_CLIENT = "aiokafka"


class ClientRepeats(logging.Filter):
    """For the process's log handlers: a client (``aiokafka*`` logger) warning or error of
    a kind (logger and message template) seen in the last ``every_s`` is left out and
    counted; the next one let through says how many were. ``flush``, called now and then,
    says it for a kind that has gone quiet for ``quiet_s``: the end of an outage shows."""

    def __init__(
        self,
        every_s: float = 60.0,
        quiet_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.every_s = every_s
        self.quiet_s = quiet_s
        self.clock = clock
        self._last: dict[tuple[str, object], float] = {}  # kind -> when one was let through
        self._since: Counter[tuple[str, object]] = Counter()  # kind -> left out since
        # kind -> the latest left out: (level, its text, when)
        self._latest: dict[tuple[str, object], tuple[int, str, float]] = {}

    def handler(self, stream: TextIO) -> logging.Handler:
        """The process's log handler, writing to ``stream``, with this filter: a filter on
        a logger misses its children's records, and the client logs under a dozen names."""
        h = logging.StreamHandler(stream)
        h.addFilter(self)
        return h

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno < logging.WARNING
            or getattr(record, SUMMARY_ATTR, False)
            or not (record.name == _CLIENT or record.name.startswith(_CLIENT + "."))
        ):
            return True
        key = (record.name, record.msg)
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._since[key] += 1
            self._latest[key] = (record.levelno, record.getMessage(), now)
            return False
        left_out = self._since.pop(key, 0)
        self._latest.pop(key, None)
        if left_out:
            # Formatted here: the count must not meet a % in the client's own text.
            record.msg = f"{record.getMessage()} ({left_out} more like it left out since)"
            record.args = None
        self._last[key] = now
        return True

    def flush(self) -> None:
        """Say how many of each kind were left out, for every kind none of which came in
        the last ``quiet_s``: the last line of an outage, rather than silence."""
        now = self.clock()
        for key, (level, text, when) in list(self._latest.items()):
            if now - when < self.quiet_s:
                continue
            del self._latest[key]
            n = self._since.pop(key, 0)
            logging.getLogger(key[0]).log(
                level, "%s (%d more like it left out, the last %.0f s ago; none since)",
                text, n, now - when, extra={SUMMARY_ATTR: True},
            )  # fmt: skip


CLIENT_REPEATS = ClientRepeats()
