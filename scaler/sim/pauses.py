"""Start-up and rebalance pauses per backend, as the benchmarks measured them.

The simulator draws each handler's start-up and each rebalance's stop from
these ranges instead of using one constant, so a policy that needs many scale
steps pays for them as it would live. Sources (this repository):

* ``bench/bench_scaler.py`` rebalance bench with real handler processes, two runs
  (``bench/results/2026-12-06-scaler.json``, "rebalances", and the run it replaced,
  committed in efcb208): per join or leave the whole group paused 0.09-0.30 s, and
  the partitions that moved stalled 0.38-1.77 s (their new owner restores and
  commits before it consumes; 0.53-1.03 s in the quiet run, 0.38-1.77 s in the one
  after a test run). The simulator stops the whole group for the moved partitions'
  stall: lag is read as the oldest waiting record, which sits on a moved partition.
  ``tests/test_sim.py`` fails if a committed measurement leaves these ranges.
* The same bench: a handler process joined its group 1.3-1.7 s after its start in
  the quiet run and 2.7-3.3 s in the other; so start to join 1.3-3.3 s.
* ``bench/bench_scaler.py --timeline`` (README, "Scaler" section): a docker
  handler's start to its group join took 2.9-3.2 s on two busy cores.
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


# A moved partition's longest stall per join or leave (the group protocol's, not the backend's).
REBALANCE_S = (0.38, 1.77)

BENCH_PAUSES: dict[str, Pauses] = {
    "process": Pauses(startup_s=(1.3, 3.3), rebalance_s=REBALANCE_S),
    "docker": Pauses(startup_s=(2.9, 3.2), rebalance_s=REBALANCE_S),
    # A swarm service update adds the scheduler's round trip to a docker start.
    "swarm": Pauses(startup_s=(4.0, 8.0), rebalance_s=REBALANCE_S),
}


def pauses_for(backend: str) -> Pauses:
    try:
        return BENCH_PAUSES[backend]
    except KeyError:
        names = ", ".join(BENCH_PAUSES)
        raise ValueError(f"unknown backend {backend!r} (one of {names})") from None
