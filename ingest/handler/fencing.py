"""Group-generation fencing of transactional offset commits (KIP-447), which aiokafka lacks.

A handler commits all its partitions in one transaction per poll, with one
transactional producer per handler. Nothing in the producer's epoch then ties
a partition to its owner, so the consumer group does the fencing, as in KIP-447:

- The transaction's offset commit (TxnOffsetCommit v3) carries the member id and
  generation under which the records were consumed; the group coordinator
  refuses it once the partitions have moved, and the transaction is aborted
  (``FencedProducer``).
- A new owner reads its start offset with OffsetFetch v7 ``require_stable``: the
  broker answers UNSTABLE_OFFSET_COMMIT while a transaction holding an offset for
  the partition is open, so the new owner waits for the old one to commit or
  abort instead of starting from an offset about to be superseded.
- An owner killed or frozen mid-transaction would hold that offset until its
  transaction times out. ListTransactions and DescribeGroups find the group's
  handlers that hold a transaction open without being members any more
  (``stale_transactions``), and the new owner fences them.

aiokafka 0.14 sends TxnOffsetCommit v0 and OffsetFetch up to v3 and has no
ListTransactions: those requests, and the private attributes sending them takes,
live in ``core/aiokafka_internals.py`` (the one module that answers to a change of
aiokafka). This module keeps the policy: retries, what counts as unstable, whom to
fence.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiokafka.errors as Errors
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.aiokafka_internals import (
    UNSTABLE_OFFSET_COMMIT,
    FencedProducer,
    GroupFenced,
    GroupMetadata,
    fetch_offset,
    member_client_ids,
    open_transactions,
)

# The producer and the group identity are re-exported: the handler's commits take them
# from here, with the rest of the fencing.
__all__ = [
    "Committed",
    "FencedProducer",
    "GroupFenced",
    "GroupMetadata",
    "Unstable",
    "fetch_committed",
    "stale_transactions",
]

log = logging.getLogger(__name__)


# Consumer side -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Committed:
    offset: int | None  # None: nothing committed yet
    metadata: str


class Unstable(Exception):
    """A transaction holding an offset for the partition is still open."""


async def fetch_committed(
    consumer: AIOKafkaConsumer, group_id: str, tp: TopicPartition, require_stable: bool
) -> Committed:
    """The group's committed offset for ``tp``; raises :class:`Unstable` while a
    transaction commits one (with ``require_stable``)."""
    for attempt in range(50):
        try:
            code, offset, metadata = await fetch_offset(consumer, group_id, tp, require_stable)
        except (Errors.NodeNotReadyError, Errors.RequestTimedOutError) as e:
            log.debug("%s: offset fetch failed (%r), retry %d", tp, e, attempt + 1)
            await asyncio.sleep(0.1)
            continue
        if not code:
            return Committed(offset if offset >= 0 else None, metadata)
        if code == UNSTABLE_OFFSET_COMMIT:
            raise Unstable(str(tp))
        error = Errors.for_code(code)
        if not getattr(error, "retriable", False) and error not in (
            Errors.NotCoordinatorError,
            Errors.CoordinatorNotAvailableError,
            Errors.CoordinatorLoadInProgressError,
        ):
            raise error(f"offset fetch for {tp}")
        await asyncio.sleep(0.1)
    raise Errors.KafkaError(f"offset fetch for {tp} kept failing")


# Stale transactions --------------------------------------------------------------------------


async def stale_transactions(consumer: AIOKafkaConsumer, group_id: str, prefix: str) -> set[str]:
    """Open transactions of the group's handlers (ids ``prefix + client id``) that are not
    members of the group any more.

    Only such a handler can hold a moved partition's offset in an open transaction: a
    member finishes its batch in flight before it gives a partition up, and a handler
    that fails a commit replaces its producer, which aborts the transaction. What is
    left is a handler killed, frozen or evicted mid-transaction, which the group has
    fenced already: fencing its producer too costs nobody any work.
    """
    held = await open_transactions(consumer, prefix)
    if not held:
        return set()
    members = await member_client_ids(consumer, group_id)
    return {tid for tid in held if tid[len(prefix) :] not in members}
