"""What the scaler knows at one poll: a measurement snapshot of the group and topic.

Plain frozen dataclasses so the policy, the simulator and the tests can build
snapshots without a broker; only ``scaler.lag`` fills them from Kafka.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

# Group states (DescribeGroups) in which the members are still agreeing on an
# assignment: every member has stopped consuming under eager rebalancing.
REBALANCING_STATES = frozenset({"PreparingRebalance", "CompletingRebalance"})


@dataclass(frozen=True)
class PartitionLag:
    """Offsets and lag of one partition of the raw topic for the handler group."""

    partition: int
    start_offset: int
    end_offset: int
    committed: int | None  # None: the group never committed on this partition
    lag: int  # end - committed, or end - start without a commit
    lag_s: float  # age of the oldest unprocessed record; 0 without lag


@dataclass(frozen=True)
class Snapshot:
    """One poll's measurement. Rates are smoothed (EWMA) messages per second."""

    time: float  # unix seconds when the offsets were read
    partitions: tuple[PartitionLag, ...] = ()
    lag_msgs: int = 0
    lag_s: float = 0.0  # worst partition: the oldest unprocessed message overall
    ingest_rate: float = 0.0  # into the raw topic (sum of end-offset deltas)
    process_rate: float = 0.0  # by the group (sum of committed-offset deltas)
    members: int = 0
    partitions_hint: int = 0  # partition count when ``partitions`` is not itemised (simulation)
    group_state: str = "Empty"
    capacity: float | None = None  # msgs/s one handler sustains; None = unknown yet
    capacity_source: str = "none"  # "learned" (handler self-reports) | "fallback" | "none"
    # The trading day's clock for the calendar signal: None = the snapshot's own
    # time; ``market_known`` False = no market clock (replay not running).
    market_time: float | None = None
    market_speed: float = 1.0
    market_known: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def partition_count(self) -> int:
        return len(self.partitions) or self.partitions_hint

    @property
    def rebalancing(self) -> bool:
        return self.group_state in REBALANCING_STATES

    def with_capacity(self, capacity: float | None, source: str) -> Snapshot:
        return replace(self, capacity=capacity, capacity_source=source)

    def as_dict(self) -> dict[str, Any]:
        """Inputs of a decision, compact enough for the audit stream and logs."""
        return {
            "time": round(self.time, 3),
            "lag_msgs": self.lag_msgs,
            "lag_s": round(self.lag_s, 3),
            "ingest_rate": round(self.ingest_rate, 1),
            "process_rate": round(self.process_rate, 1),
            "members": self.members,
            "group_state": self.group_state,
            "partitions": self.partition_count,
            "capacity": None if self.capacity is None else round(self.capacity, 1),
            "capacity_source": self.capacity_source,
        }


class Ewma:
    """Exponentially weighted rate, weighted by elapsed time rather than by sample.

    Polls are not evenly spaced (a slow broker round trip stretches one), so the
    weight of a new sample is ``1 - exp(-dt / tau)``: a 3 s gap counts three times
    as much as a 1 s gap, and ``halflife_s`` means the same thing at any poll rate.
    """

    def __init__(self, halflife_s: float = 5.0) -> None:
        self.tau = halflife_s / math.log(2)
        self.value: float | None = None

    def update(self, sample: float, dt: float) -> float:
        if self.value is None or dt <= 0:
            self.value = sample if self.value is None else self.value
            return self.value
        w = 1.0 - math.exp(-dt / self.tau)
        self.value += w * (sample - self.value)
        return self.value
