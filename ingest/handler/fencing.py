"""Group-generation fencing of transactional offset commits (KIP-447), which aiokafka lacks.

A handler commits all its partitions in one transaction per poll, with one
transactional producer per handler. Nothing in the producer's epoch then ties
a partition to its owner, so the consumer group does the fencing, as in KIP-447:

- The transaction's offset commit (TxnOffsetCommit v3) carries the member id and
  generation under which the records were consumed; the group coordinator
  refuses it once the partitions have moved, and the transaction is aborted.
- A new owner reads its start offset with OffsetFetch v7 ``require_stable``: the
  broker answers UNSTABLE_OFFSET_COMMIT while a transaction holding an offset for
  the partition is open, so the new owner waits for the old one to commit or
  abort instead of starting from an offset about to be superseded.
- An owner killed or frozen mid-transaction would hold that offset until its
  transaction times out. ListTransactions and DescribeGroups find the group's
  handlers that hold a transaction open without being members any more
  (``stale_transactions``), and the new owner fences them.

aiokafka 0.14 sends TxnOffsetCommit v0 and OffsetFetch up to v3 and has no
ListTransactions, so these requests are defined here on its protocol layer, and
the producer's sender is given the v3 commit. This reaches into aiokafka
internals (``_sender``, ``_txn_manager``, ``_coordinator``, ``_client``), hence
its pin to 0.14.x in pyproject.toml; the zombie and stale-generation tests
exercise every piece against the real broker.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import Any

import aiokafka.errors as Errors
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import ConnectionGroup, CoordinationType
from aiokafka.producer.sender import TxnOffsetCommitHandler
from aiokafka.protocol.admin import DescribeGroupsRequest
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)
from aiokafka.structs import OffsetAndMetadata

log = logging.getLogger(__name__)

UNSTABLE_OFFSET_COMMIT = 88
# What the group coordinator answers a commit from a member that is no longer the
# partitions' owner: a stale generation, or a member already removed from the group.
_FENCING_ERRORS = (
    Errors.IllegalGenerationError,
    Errors.UnknownMemberIdError,
    Errors.RebalanceInProgressError,
)
_FENCED_INSTANCE_ID = 82


class GroupFenced(Errors.KafkaError):
    """The group coordinator refused the transaction's offsets: this member no
    longer owns the partitions (or never finished joining). Abort and rejoin."""


@dataclass(frozen=True, slots=True)
class GroupMetadata:
    """The consumer's group identity at the moment its records are committed."""

    group_id: str
    generation_id: int
    member_id: str

    @classmethod
    def of(cls, consumer: AIOKafkaConsumer, group_id: str) -> GroupMetadata:
        coord = consumer._coordinator
        if coord is None:
            raise GroupFenced("consumer has no group coordinator")
        meta = cls(group_id, coord.generation, coord.member_id)
        if meta.generation_id < 0 or not meta.member_id:
            # The coordinator forgets its membership on a heartbeat's
            # UNKNOWN_MEMBER_ID or ILLEGAL_GENERATION. The broker skips the
            # generation check for an empty member id, so such a commit would not
            # be fenced: refuse it here.
            raise GroupFenced(f"not a member of {group_id!r} (generation {meta.generation_id})")
        return meta


# Protocol ------------------------------------------------------------------------------------


def _by_topic(*partition_fields: tuple[str, Any]) -> CompactArray:
    """The flexible versions' ``[topic name, [partition fields..., tags], tags]`` field."""
    return CompactArray(
        ("name", CompactString("utf-8")),
        ("partitions", CompactArray(*partition_fields, ("tags", TaggedFields))),
        ("tags", TaggedFields),
    )


class TxnOffsetCommitResponse_v3(Response):
    API_KEY = 28
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("topics", _by_topic(("partition_index", Int32), ("error_code", Int16))),
        ("tags", TaggedFields),
    )


class TxnOffsetCommitRequest_v3(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 28
    API_VERSION = 3
    RESPONSE_TYPE = TxnOffsetCommitResponse_v3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("group_id", CompactString("utf-8")),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", CompactString("utf-8")),
        ("group_instance_id", CompactString("utf-8")),
        (
            "topics",
            _by_topic(
                ("partition_index", Int32),
                ("committed_offset", Int64),
                ("committed_leader_epoch", Int32),
                ("committed_metadata", CompactString("utf-8")),
            ),
        ),
        ("tags", TaggedFields),
    )


class TxnOffsetCommitV3(Request[TxnOffsetCommitRequest_v3]):
    API_KEY = 28

    def __init__(self, **fields: Any) -> None:
        self._fields = fields

    def build(
        self, request_struct_class: type[TxnOffsetCommitRequest_v3]
    ) -> TxnOffsetCommitRequest_v3:
        return request_struct_class(**self._fields)


class OffsetFetchResponse_v7(Response):
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            _by_topic(
                ("partition_index", Int32),
                ("committed_offset", Int64),
                ("committed_leader_epoch", Int32),
                ("metadata", CompactString("utf-8")),
                ("error_code", Int16),
            ),
        ),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class OffsetFetchRequest_v7(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 9
    API_VERSION = 7
    RESPONSE_TYPE = OffsetFetchResponse_v7
    SCHEMA = Schema(
        ("group_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("partition_indexes", CompactArray(Int32)),
                ("tags", TaggedFields),
            ),
        ),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


class OffsetFetchV7(Request[OffsetFetchRequest_v7]):
    API_KEY = 9

    def __init__(self, group_id: str, tps: list[TopicPartition], require_stable: bool) -> None:
        by_topic: dict[str, list[int]] = collections.defaultdict(list)
        for tp in tps:
            by_topic[tp.topic].append(tp.partition)
        self._args: tuple[Any, ...] = (
            group_id,
            [(t, sorted(ps), {}) for t, ps in sorted(by_topic.items())],
            require_stable,
            {},
        )

    def build(self, request_struct_class: type[OffsetFetchRequest_v7]) -> OffsetFetchRequest_v7:
        return request_struct_class(*self._args)


# Producer ------------------------------------------------------------------------------------


class _FencedOffsetCommit(TxnOffsetCommitHandler):
    def __init__(
        self, sender: Any, offsets: dict[TopicPartition, OffsetAndMetadata], meta: GroupMetadata
    ) -> None:
        super().__init__(sender, offsets, meta.group_id)
        self._meta = meta

    def create_request(self) -> TxnOffsetCommitV3:
        txn = self._sender._txn_manager
        topics: dict[str, list[tuple[int, int, int, str, dict[int, bytes]]]] = (
            collections.defaultdict(list)
        )
        for tp, om in sorted(self._offsets.items()):
            topics[tp.topic].append((tp.partition, om.offset, -1, om.metadata, {}))
        return TxnOffsetCommitV3(
            transactional_id=txn.transactional_id,
            group_id=self._meta.group_id,
            producer_id=txn.producer_id,
            producer_epoch=txn.producer_epoch,
            generation_id=self._meta.generation_id,
            member_id=self._meta.member_id,
            group_instance_id=None,
            topics=[(t, ps, {}) for t, ps in topics.items()],
            tags={},
        )

    def handle_response(self, resp: Any) -> float | None:
        txn = self._sender._txn_manager
        for topic, partitions, _ in resp.topics:
            for partition, code, _ in partitions:
                error = Errors.for_code(code)
                if error is Errors.NoError:
                    tp = TopicPartition(topic, partition)
                    txn.offset_committed(tp, self._offsets[tp].offset, self._group_id)
                    continue
                if error in _FENCING_ERRORS or code == _FENCED_INSTANCE_ID:
                    # Abortable, not fatal: the producer stays usable for the
                    # handler's next generation.
                    txn.error_transaction(
                        GroupFenced(
                            f"offset commit refused ({error.__name__}) for generation "
                            f"{self._meta.generation_id} of member {self._meta.member_id}"
                        )
                    )
                    return None
                # Every other answer (retry, coordinator moved, epoch fenced) is
                # handled as aiokafka handles it for v0.
                return super().handle_response(_V0View(topic, partition, code))
        return None


class _V0View:
    """One partition's answer in the shape of a v0 response, for the base handler."""

    def __init__(self, topic: str, partition: int, code: int) -> None:
        self.errors = [(topic, [(partition, code)])]


class FencedProducer(AIOKafkaProducer):
    """A transactional producer whose offset commits carry the group's generation."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._group_meta: GroupMetadata | None = None
        # The sender looks the method up on its instance, so this shadows aiokafka's v0
        # commit for this producer only.
        self._sender._do_txn_offset_commit = self._txn_offset_commit

    async def stop(self) -> None:
        # The handler replaces a producer whose transaction failed instead of
        # aborting it (FeedHandler._recover says why), so nothing awaits the
        # transaction's end, which holds the failure: read it here, or asyncio logs
        # each refused commit again as an error never retrieved. (There is no waiter
        # before the producer's first transaction.)
        waiter = self._txn_manager._transaction_waiter
        if waiter is not None and waiter.done() and not waiter.cancelled():
            waiter.exception()
        await super().stop()

    async def send_offsets_fenced(
        self, offsets: dict[TopicPartition, OffsetAndMetadata], meta: GroupMetadata
    ) -> None:
        self._group_meta = meta
        await self.send_offsets_to_transaction(offsets, meta.group_id)

    async def _txn_offset_commit(
        self, offsets: dict[TopicPartition, OffsetAndMetadata], group_id: str
    ) -> None:
        if not offsets:
            return
        meta = self._group_meta
        assert meta is not None and meta.group_id == group_id, "use send_offsets_fenced()"
        sender = self._sender
        try:
            node_id = await sender._find_coordinator(CoordinationType.GROUP, group_id)
        except Errors.GroupAuthorizationFailedError as exc:
            sender._txn_manager.error_transaction(exc)
            return
        await _FencedOffsetCommit(sender, offsets, meta).do(node_id)


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
    client = consumer._client
    for attempt in range(50):
        node_id = await client.coordinator_lookup(CoordinationType.GROUP, group_id)
        try:
            resp = await client.send(
                node_id,
                OffsetFetchV7(group_id, [tp], require_stable),
                group=ConnectionGroup.COORDINATION,
            )
        except (Errors.NodeNotReadyError, Errors.RequestTimedOutError) as e:
            log.debug("%s: offset fetch failed (%r), retry %d", tp, e, attempt + 1)
            await asyncio.sleep(0.1)
            continue
        code = resp.error_code
        for _, partitions, _ in resp.topics:
            for partition, offset, _, metadata, pcode, _ in partitions:
                if partition == tp.partition and pcode:
                    code = pcode
                elif partition == tp.partition and not code:
                    return Committed(offset if offset >= 0 else None, metadata or "")
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


class ListTransactionsResponse_v0(Response):
    API_KEY = 66
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("unknown_state_filters", CompactArray(CompactString("utf-8"))),
        (
            "transaction_states",
            CompactArray(
                ("transactional_id", CompactString("utf-8")),
                ("producer_id", Int64),
                ("transaction_state", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class ListTransactionsRequest_v0(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 66
    API_VERSION = 0
    RESPONSE_TYPE = ListTransactionsResponse_v0
    SCHEMA = Schema(
        ("state_filters", CompactArray(CompactString("utf-8"))),
        ("producer_id_filters", CompactArray(Int64)),
        ("tags", TaggedFields),
    )


class ListTransactions(Request[ListTransactionsRequest_v0]):
    API_KEY = 66

    def __init__(self, states: list[str]) -> None:
        self._states = states

    def build(
        self, request_struct_class: type[ListTransactionsRequest_v0]
    ) -> ListTransactionsRequest_v0:
        return request_struct_class(self._states, [], {})


async def open_transactions(consumer: AIOKafkaConsumer, prefix: str) -> set[str]:
    """The transactional ids starting with ``prefix`` whose transaction is open."""
    client = consumer._client
    found: set[str] = set()
    # Each broker lists only the transactions it coordinates.
    for broker in client.cluster.brokers():
        resp = await client.send(broker.nodeId, ListTransactions(["Ongoing"]))
        if resp.error_code:
            raise Errors.for_code(resp.error_code)(f"list transactions on {broker.nodeId}")
        found |= {tid for tid, _, _, _ in resp.transaction_states if tid.startswith(prefix)}
    return found


async def member_client_ids(consumer: AIOKafkaConsumer, group_id: str) -> set[str]:
    """The client ids of the group's current members."""
    client = consumer._client
    node_id = await client.coordinator_lookup(CoordinationType.GROUP, group_id)
    resp = await client.send(node_id, DescribeGroupsRequest([group_id]))
    ((code, _, _, _, _, members, *_),) = resp.groups
    if code:
        raise Errors.for_code(code)(f"describe group {group_id!r}")
    return {client_id for _, client_id, *_ in members}


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
