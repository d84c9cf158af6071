"""Start-up and rebalance pauses per backend, as the benchmarks measured them.

The simulator draws each handler's start-up and each rebalance's stop from
these ranges instead of using one constant, so a policy that needs many scale
steps pays for them as it would live. Sources (this repository):

* ``bench/bench_scaler.py --timeline`` (README, "Scaler" section): a docker
  handler's start to its group join took 2.9-3.2 s on two busy cores; the
  process backend's step-to-consuming was 6.2 s of which about 1.5 s is
  detection and decision, so start to join 3-5 s.
* NOTES ("Measured on this machine"): an aiokafka eager rebalance stops the
  whole group for about 0.1 s; a new member's first record comes 0.2-2.9 s
  after its join (it waits for the next heartbeat), during which its
  partitions are idle. The simulator charges that whole span to the group.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Pauses:
    startup_s: tuple[float, float]  # handler start -> member of the group
    rebalance_s: tuple[float, float]  # group stopped per join or leave

    def startup(self, rng: random.Random) -> float:
        return rng.uniform(*self.startup_s)

    def rebalance(self, rng: random.Random) -> float:
        return rng.uniform(*self.rebalance_s)


BENCH_PAUSES: dict[str, Pauses] = {
    "process": Pauses(startup_s=(3.0, 5.0), rebalance_s=(0.2, 2.9)),
    "docker": Pauses(startup_s=(2.9, 3.2), rebalance_s=(0.2, 2.9)),
    # A swarm service update adds the scheduler's round trip to a docker start.
    "swarm": Pauses(startup_s=(4.0, 8.0), rebalance_s=(0.2, 2.9)),
}


def pauses_for(backend: str) -> Pauses:
    try:
        return BENCH_PAUSES[backend]
    except KeyError:
        names = ", ".join(BENCH_PAUSES)
        raise ValueError(f"unknown backend {backend!r} (one of {names})") from None
