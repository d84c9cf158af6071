"""The handler's readiness while it cannot commit: lifted by a commit, or lapsing."""

from __future__ import annotations

import time

from ingest.handler.probes import Probes
from ingest.handler.settings import HandlerSettings


def _ready_probes() -> Probes:
    p = Probes(HandlerSettings())
    p.started = p.joined = True
    return p


def test_a_block_is_lifted_by_a_commit() -> None:
    p = _ready_probes()
    assert p.ready()
    p.block("topic md.ticks is not on the broker", 60)
    assert not p.ready() and p.healthy()  # alive: a restart would not bring the topic back
    p.unblock()
    assert p.ready()


def test_a_block_not_renewed_lapses() -> None:
    """A handler whose partitions went to others has nothing to commit, so nothing renews
    or lifts the mark: it must not stay unready for ever."""
    p = _ready_probes()
    p.block("topic md.ticks is not on the broker", 0.3)
    assert not p.ready()
    time.sleep(0.4)
    assert p.ready()
