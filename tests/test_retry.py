"""core.retry: the one backoff schedule, and what its retry loops retry and give up on."""

from __future__ import annotations

import logging

import pytest

from core.retry import backoff_s, retry_async, retry_sync

log = logging.getLogger("test.retry")


def test_backoff_doubles_is_jittered_and_capped() -> None:
    for n, base in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6)]:
        waits = {backoff_s(n, 0.2, 5.0) for _ in range(50)}
        assert all(base <= w <= base * 1.1 for w in waits), (n, waits)
        assert len(waits) > 1  # jittered: not the same wait for every caller
    assert {backoff_s(n, 0.2, 5.0) for n in (6, 10, 40)} == {5.0}


async def test_retries_what_it_is_told_then_raises_the_last_failure() -> None:
    calls: list[int] = []
    slept: list[float] = []

    async def step() -> int:
        calls.append(1)
        raise OSError(f"down {len(calls)}")

    async def sleep(s: float) -> None:
        slept.append(s)

    with pytest.raises(OSError, match="down 4"):
        await retry_async(
            step, what="reach it", attempts=4, first_s=0.1, max_s=0.25,
            retry_on=lambda e: isinstance(e, OSError), sleep=sleep, log=log,
        )  # fmt: skip
    assert len(calls) == 4 and len(slept) == 3
    assert 0.1 <= slept[0] <= 0.11 and slept[2] == 0.25


async def test_a_failure_it_is_not_told_to_retry_is_raised_at_once() -> None:
    calls: list[int] = []

    async def step() -> None:
        calls.append(1)
        raise ValueError("a bug, not an outage")

    async def sleep(s: float) -> None:
        raise AssertionError("no wait expected")

    with pytest.raises(ValueError):
        await retry_async(
            step, what="reach it", attempts=5, first_s=0.1, max_s=1.0,
            retry_on=lambda e: isinstance(e, OSError), sleep=sleep, log=log,
        )  # fmt: skip
    assert len(calls) == 1


def test_sync_returns_the_first_success(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def step() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("not yet")
        return "done"

    with caplog.at_level(logging.WARNING, logger="test.retry"):
        got = retry_sync(
            step, what="reach it", attempts=5, first_s=0.001, max_s=0.01,
            retry_on=lambda e: isinstance(e, OSError), log=log,
        )  # fmt: skip
    assert got == "done" and len(calls) == 3
    assert [r.getMessage() for r in caplog.records] == [
        "cannot reach it (OSError('not yet')), retry 1",
        "cannot reach it (OSError('not yet')), retry 2",
    ]
