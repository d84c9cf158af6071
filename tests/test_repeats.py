"""A failure repeated every cycle of a loop is said once, then once a minute, then its end."""

from __future__ import annotations

import logging

import pytest
from aiokafka.errors import KafkaError
from redis.exceptions import ConnectionError as RedisConnectionError

from core.repeats import RepeatedFailure, describe


def test_said_once_then_once_a_minute_then_its_end(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    r = RepeatedFailure(logging.getLogger("t"), "poll", clock=lambda: now[0])
    caplog.set_level(logging.INFO, "t")
    for _ in range(150):  # 150 s of failures, one a second
        r.failed(KafkaError("topic 'md.raw' has no partitions"))
        now[0] += 1.0
    said = [rec.getMessage() for rec in caplog.records]
    assert said == [
        "poll failed: KafkaError: topic 'md.raw' has no partitions",
        "poll still failing (60 times in the last 60 s): KafkaError: topic 'md.raw' has no "
        "partitions",
        "poll still failing (60 times in the last 60 s): KafkaError: topic 'md.raw' has no "
        "partitions",
    ]
    assert r.failing
    caplog.clear()
    # Another kind of failure is said at once.
    r.failed(RedisConnectionError("Error 111 connecting to 127.0.0.1:6379."))
    r.succeeded()
    r.succeeded()  # said once
    assert [rec.getMessage() for rec in caplog.records] == [
        "poll failed: ConnectionError: Error 111 connecting to 127.0.0.1:6379.",
        "poll succeeds again, after 151 failures over 150 s",
    ]
    assert not r.failing
    caplog.clear()
    # A new run of failures starts afresh: its first is said at once.
    r.failed(KafkaError("topic 'md.raw' has no partitions"))
    assert len(caplog.records) == 1 and "poll failed" in caplog.records[0].getMessage()


def test_describe_names_the_type_once() -> None:
    assert describe(KafkaError("x")) == "KafkaError: x"
    assert describe(OSError(5, "I/O")) == "OSError: [Errno 5] I/O"
    assert describe(TimeoutError()) == "TimeoutError"
