"""The client's repeated lines: produce retries counted, a missing topic said once a minute."""

from __future__ import annotations

import inspect
import logging
import sys
import types

import pytest
from aiokafka import TopicPartition, cluster
from aiokafka.errors import NotEnoughReplicasError, NotLeaderForPartitionError
from aiokafka.producer import sender
from prometheus_client import REGISTRY

from core.aiokafka_internals import (
    CLUSTER_LOGGER,
    PRODUCE_RETRY_MSG,
    SENDER_LOGGER,
    TOPIC_NOT_FOUND_MSG,
)
from core.client_log import SUMMARY_ATTR, ClientRepeats, MissingTopics
from ingest.handler.retry_log import ProduceRetries


def _retries(error: str) -> float:
    got = REGISTRY.get_sample_value("tickscale_handler_produce_retries_total", {"error": error})
    return got or 0.0


def test_one_report_a_minute_with_every_retry_counted(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    f = ProduceRetries(every_s=60, clock=lambda: now[0])
    log = logging.getLogger(SENDER_LOGGER)
    tp = TopicPartition("md.ticks", 3)
    before = _retries("NotEnoughReplicasError"), _retries("NotLeaderForPartitionError")
    # Alone on the logger: an in-process handler of an earlier test installed the
    # process's own filter, which would count these too and hold most of them back.
    installed = log.filters[:]
    log.filters[:] = [f]
    try:
        with caplog.at_level(logging.WARNING, logger=SENDER_LOGGER):
            for _ in range(5):  # the first is reported at once
                log.warning(PRODUCE_RETRY_MSG, tp, NotEnoughReplicasError)
                now[0] += 1
            log.warning(PRODUCE_RETRY_MSG, tp, NotLeaderForPartitionError())  # an instance, too
            log.warning("Got error produce response: %s", "connection lost")  # not a retry
            now[0] += 60
            log.warning(PRODUCE_RETRY_MSG, tp, NotEnoughReplicasError)
    finally:
        log.filters[:] = installed
    assert [r.getMessage() for r in caplog.records] == [
        f"produce retried (NotEnoughReplicasError x1) since the last report; the latest on {tp}",
        "Got error produce response: connection lost",
        "produce retried (NotEnoughReplicasError x5, NotLeaderForPartitionError x1) since the "
        f"last report; the latest on {tp}",
    ]
    assert _retries("NotEnoughReplicasError") - before[0] == 6
    assert _retries("NotLeaderForPartitionError") - before[1] == 1


def test_a_missing_topic_is_one_line_a_minute_per_topic(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    f = MissingTopics(every_s=60, clock=lambda: now[0])
    log = logging.getLogger(CLUSTER_LOGGER)
    installed = log.filters[:]
    log.filters[:] = [f]
    try:
        with caplog.at_level(logging.ERROR, logger=CLUSTER_LOGGER):
            for _ in range(4):  # twice a second while the topic is gone
                log.error(TOPIC_NOT_FOUND_MSG, "md.ticks")
                now[0] += 0.5
            log.error(TOPIC_NOT_FOUND_MSG, "md.deadletter")  # another topic: its own line
            log.error("Topic %s is not authorized for this client", "md.ticks")  # not this
            now[0] += 60
            log.error(TOPIC_NOT_FOUND_MSG, "md.ticks")
    finally:
        log.filters[:] = installed
    assert [r.getMessage() for r in caplog.records] == [
        "the client finds no topic md.ticks on the broker (1 metadata answers without it "
        "since the last report)",
        "the client finds no topic md.deadletter on the broker (1 metadata answers without "
        "it since the last report)",
        "Topic md.ticks is not authorized for this client",
        "the client finds no topic md.ticks on the broker (4 metadata answers without it "
        "since the last report)",
    ]


@pytest.mark.parametrize(
    ("module", "message"),
    [(sender, PRODUCE_RETRY_MSG), (cluster, TOPIC_NOT_FOUND_MSG)],
    ids=["produce-retry", "topic-not-found"],
)
def test_the_matched_lines_are_the_clients_own(module: object, message: str) -> None:
    """The filters match the client's log text exactly: a release that rewords a line
    would let its flood through unnoticed, so this fails instead."""
    assert message in _string_constants(module)


def _string_constants(module: object) -> set[str]:
    """Every string literal of a module as compiled (adjacent literals joined)."""
    found: set[str] = set()
    todo = [compile(inspect.getsource(module), "<module>", "exec")]  # type: ignore[arg-type]
    while todo:
        code = todo.pop()
        for c in code.co_consts:
            if isinstance(c, str):
                found.add(c)
            elif isinstance(c, types.CodeType):
                todo.append(c)
    return found


def test_client_repeats_are_logged_once_a_minute_with_the_count() -> None:
    now = [0.0]
    f = ClientRepeats(every_s=60, clock=lambda: now[0])

    def rec(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, args, None)

    refused = "Unable connect to node with id %s: %s"
    assert f.filter(rec("aiokafka", refused, 1, "refused"))
    # The same kind again, with other values: left out for a minute.
    assert not any(f.filter(rec("aiokafka", refused, 1, f"try {i}")) for i in range(500))
    # Other kinds, other levels and other loggers are not held back by it.
    assert f.filter(rec("aiokafka.consumer.fetcher", "Failed fetch messages from %s: %s", 1, "x"))
    assert f.filter(rec("aiokafka", refused, 1, "x", level=logging.INFO))
    assert f.filter(rec("ingest.handler.recovery", refused, 1, "x"))
    assert f.filter(rec("aiokafkaesque", refused, 1, "x"))
    # A missing topic's lines are already one a minute per topic, by their own filter.
    for topic in ("md.ticks", "md.deadletter"):
        summarised = rec(CLUSTER_LOGGER, TOPIC_NOT_FOUND_MSG, topic)
        assert MissingTopics(clock=lambda: now[0]).filter(summarised)
        assert getattr(summarised, SUMMARY_ATTR) is True
        assert f.filter(summarised)
    now[0] = 61.0
    r = rec("aiokafka", refused, 1, "100% refused")
    assert f.filter(r)
    assert r.getMessage() == (
        "Unable connect to node with id 1: 100% refused (500 more like it left out since)"
    )
    assert not f.filter(rec("aiokafka", refused, 1, "again"))


def test_client_repeats_say_how_many_once_a_kind_has_gone_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    f = ClientRepeats(every_s=60, quiet_s=10, clock=lambda: now[0])
    log = logging.getLogger("aiokafka.consumer.fetcher")
    log.addFilter(f)  # on the logger here, so caplog sees what passes
    try:
        with caplog.at_level(logging.WARNING, logger="aiokafka.consumer.fetcher"):
            for i in range(40):  # an outage: a failed fetch every 100 ms
                log.error("Failed fetch messages from %s: %s", 1, f"attempt {i}")
                now[0] += 0.1
            f.flush()  # still failing a moment ago: nothing to say yet
            now[0] += 10
            f.flush()
            f.flush()  # said once
    finally:
        log.removeFilter(f)
    assert [r.getMessage() for r in caplog.records] == [
        "Failed fetch messages from 1: attempt 0",
        "Failed fetch messages from 1: attempt 39 (39 more like it left out, the last 10 s ago; "
        "none since)",
    ]
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.ERROR]


def test_client_repeats_is_on_the_process_log_handler(capsys: pytest.CaptureFixture[str]) -> None:
    f = ClientRepeats()
    handler = f.handler(sys.stderr)
    assert f in handler.filters
    log = logging.getLogger("aiokafka.consumer.fetcher")
    log.addHandler(handler)
    try:
        for i in range(3):
            log.error("Failed fetch messages from %s: %s", 1, f"attempt {i}")
    finally:
        log.removeHandler(handler)
    assert capsys.readouterr().err == "Failed fetch messages from 1: attempt 0\n"
