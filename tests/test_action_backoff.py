"""ActionBackoff: a failed backend action waits, doubling, and another action does not."""

from __future__ import annotations

import logging

import pytest

from scaler.action_backoff import FIRST_S, MAX_S, ActionBackoff
from scaler.backends.base import BackendError


def test_the_same_action_waits_doubling_and_another_is_not_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    b = ActionBackoff(logging.getLogger("t"), clock=lambda: now[0])
    caplog.set_level(logging.INFO, "t")
    waits = [b.failed("add", 1, BackendError("disk full")) for _ in range(8)]
    for i, w in enumerate(waits):
        base = min(MAX_S, FIRST_S * 2**i)
        assert base <= w <= min(MAX_S, base * 1.1), (i, w)
    assert b.holds("add") and not b.holds("remove")
    now[0] += waits[-1]
    assert not b.holds("add")
    assert b.failed("remove", 2, BackendError("refused")) <= FIRST_S * 1.1  # its own count
    b.succeeded()
    assert not b.holds("remove")
    said = [r.getMessage() for r in caplog.records]
    assert said[0] == "backend action failed: BackendError: add(1): disk full", said
    # 60 s of failing passed before the last: one reminder with the count, then the end.
    assert said[1].startswith("backend action still failing (8 times in the last 60 s)"), said
    assert said[2].startswith("backend action succeeds again, after 9 failures"), said
    assert len(said) == 3, said
