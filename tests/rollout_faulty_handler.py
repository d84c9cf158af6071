"""``python -m tests.rollout_faulty_handler``: a deliberately faulty handler version.

(In a test image, run as a script with the container's command, ``handler``.)

It runs the real handler, except that every record at an offset divisible by
ten is also sent to the dead-letter topic (its ticks are still published), as a
version with a bad validation rule would. A rollout's guard must catch it by its
dead letters per 1,000 records; the ledger of ticks stays exact.
"""

from __future__ import annotations

import sys
from typing import Any

from ingest.handler import partition
from ingest.handler.partition import Batch, DeadLetter, PartitionWorker

_transform = PartitionWorker.transform


def _faulty(self: PartitionWorker, records: list[Any]) -> Batch | None:
    b = _transform(self, records)
    if b is not None:
        for rec in b.records:
            if rec.offset % 10 == 0:
                b.dead.append(DeadLetter(rec, "canary_fault", "every tenth record"))
    return b


PartitionWorker.transform = _faulty  # type: ignore[method-assign]
assert partition.PartitionWorker.transform is _faulty

if __name__ == "__main__":
    from tickscale.cli import app

    if sys.argv[1:2] != ["handler"]:
        sys.argv = [sys.argv[0], "handler", *sys.argv[1:]]
    app()
