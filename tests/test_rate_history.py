"""Learned session floors kept in a real Redis: what one scaler run observes, the next
one learns from (scaler.rate_history)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from scaler.calendar import SessionCalendar, parse_session_min
from scaler.floors import LearnedFloors
from scaler.policy import Policy, PolicyConfig, handlers_for
from scaler.rate_history import KEY, RateHistory, _means
from scaler.signals import Snapshot
from tickscale.localstack.net import free_port

CAL = SessionCalendar("XNYS", parse_session_min("open=2,midday=1"), lead_s=120)
CFG = PolicyConfig(min_handlers=1, max_handlers=12)
CAPACITY = 1000.0
EARLIER = [dt.date(2024, 11, 25), dt.date(2024, 11, 26), dt.date(2024, 11, 27)]
TODAY = dt.date(2024, 12, 2)
OPEN = 9 * 3600 + 1800


def snap(t: float, rate: float) -> Snapshot:
    return Snapshot(
        time=t, partitions_hint=12, group_state="Stable", members=2, ingest_rate=rate,
        capacity=CAPACITY, capacity_source="learned",
    )  # fmt: skip


def day_rate(t: int) -> float:
    """500 msgs/s, and 8,000 for the open's first ten minutes."""
    return 8000.0 if OPEN <= t < OPEN + 600 else 500.0


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_url)
    yield r
    await r.aclose()


async def live_days(
    redis: Redis, fleet: str, days: list[dt.date], run: str, min_days: int = 3
) -> Policy:
    """A scaler run's policy through ``days`` (09:00-10:00, a poll every 10 s of market
    time), its observations flushed once a market minute as the leader's polls do."""
    floors = LearnedFloors(min_days=min_days)
    history = RateHistory(redis, fleet, floors, run)
    await history.load()
    p = Policy(CFG, CAL, floors)
    for day in days:
        midnight = CAL.local_midnight(day)
        for t in range(9 * 3600, 10 * 3600, 10):
            p.proposals(snap(midnight + t, day_rate(t)), midnight + t)
            if t % 60 == 0:
                await history.flush()
        await history.flush()
    return p


def session_at(p: Policy, day: dt.date, t: int) -> int:
    midnight = CAL.local_midnight(day)
    return p.proposals(snap(midnight + t, day_rate(t)), midnight + t)[0]["session"]


async def test_a_restarted_scaler_learns_the_open_from_the_days_kept_in_redis(
    redis: Redis,
) -> None:
    fleet = f"rh{uuid.uuid4().hex[:8]}"
    first = await live_days(redis, fleet, EARLIER, "run1")
    assert first.floors is not None and not first.floors.ready  # nothing earlier to learn from
    # Without history the open's floor is the static one (open=2) ...
    assert session_at(first, TODAY, OPEN - 120) == 2

    floors = LearnedFloors(min_days=3)
    assert await RateHistory(redis, fleet, floors, "run2").load() == 3
    assert floors.ready
    assert floors.expected(OPEN + 60, CAL.day(TODAY)) == pytest.approx(8000)
    assert floors.expected(OPEN - 600, CAL.day(TODAY)) == pytest.approx(500)

    # ... with it, a morning like the earlier ones pre-scales for their open over the
    # whole lead window: at 09:28 the window holds 09:30's 8,000 msgs/s.
    p = Policy(CFG, CAL, floors)
    midnight = CAL.local_midnight(TODAY)
    for t in range(9 * 3600, OPEN - 120, 10):
        p.proposals(snap(midnight + t, 500.0), midnight + t)
    want = handlers_for(8000 * (1 + CFG.headroom), CAPACITY, 12, 12)
    assert want > 2
    assert session_at(p, TODAY, OPEN - 120) == want
    # Long before the open, only the morning's rate is expected.
    assert session_at(p, TODAY, 9 * 3600 + 600) == handlers_for(500 * 1.25, CAPACITY, 12, 12)


async def test_floors_wait_for_enough_days_and_samples_expire(redis: Redis) -> None:
    fleet = f"rh{uuid.uuid4().hex[:8]}"
    await live_days(redis, fleet, EARLIER[:1], "run1")
    floors = LearnedFloors(min_days=3)
    assert await RateHistory(redis, fleet, floors, "run2").load() == 1
    assert not floors.ready
    p = Policy(CFG, CAL, floors)
    assert session_at(p, TODAY, OPEN - 120) == 2  # the static floor until three days are known

    index = f"{KEY}:{fleet}"
    samples = [s.decode() for s in await redis.zrange(index, 0, -1)]
    assert samples == ["2024-11-25:run1"], samples
    ttl = await redis.ttl(f"{index}:{samples[0]}")
    assert 0 < ttl <= 90 * 86400


async def test_only_the_newest_days_are_remembered(redis: Redis) -> None:
    fleet = f"rh{uuid.uuid4().hex[:8]}"
    await live_days(redis, fleet, EARLIER, "run1")
    floors = LearnedFloors(days=2, min_days=1)
    assert await RateHistory(redis, fleet, floors, "run2").load() == 2
    assert floors.days_seen == 2


def test_fields_written_by_something_else_are_ignored() -> None:
    fields = {b"o:3:sum": b"30", b"o:3:n": b"3", b"junk": b"x", b"o:x:sum": b"1", b"c:-2:n": b"0"}
    assert _means(fields) == {("o", 3): 10.0}


async def test_a_redis_that_cannot_be_reached_costs_a_flush_not_the_poll() -> None:
    """The rate history is kept by the scaler's poll: a Redis refusing connections makes
    the write fail, logged, and the poll (lease, rollout) goes on."""
    gone = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    floors = LearnedFloors()
    floors.observe(OPEN + 30, CAL.day(TODAY), 900.0)
    try:
        assert await RateHistory(gone, "f", floors, "run").flush() == 0
    finally:
        await gone.aclose()
