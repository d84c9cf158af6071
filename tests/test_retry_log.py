"""The producer's routine produce retries are counted, not logged one by one."""

from __future__ import annotations

import logging

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import NotEnoughReplicasError, NotLeaderForPartitionError
from prometheus_client import REGISTRY

from core.aiokafka_internals import PRODUCE_RETRY_MSG, SENDER_LOGGER
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
