"""Everything tickscale takes from aiokafka beyond its public API, in one module.

aiokafka 0.14 lacks what exactly-once across a consumer group needs and what
telling topic incarnations apart needs: KIP-447's TxnOffsetCommit v3 (the offset
commit carries the member's generation, so a zombie's commit is refused), OffsetFetch
v7 ``require_stable``, ListTransactions, and Metadata v12 (topic ids). They are
defined here on aiokafka's protocol layer; sending them, reading a consumer's
membership, leaving a group mid-rebalance, giving a transactional producer the v3
commit and finishing a consumer's close that aiokafka leaves half done when the broker
is gone need its private attributes (``_client``, ``_coordinator``, ``_fetcher``,
``_sender``, ``_txn_manager``), which are read here and nowhere else. The callers
(``ingest/handler/fencing.py``, ``incarnation.py``, ``group_exit.py``, the local
stack's group deletion) keep their policies and see only the functions below.

So one module answers to a change of aiokafka: ``check_version`` refuses any release
but the one this was written against (pinned in pyproject.toml; every
function and class below checks it before it touches anything private), and
tests/test_aiokafka_internals.py fails as soon as another one is installed. The zombie,
stale-generation, incarnation and rollout tests exercise every piece against the real
broker.

A client that implements these itself (librdkafka: ``send_offsets_to_transaction``
with the consumer's group metadata) would make this module unnecessary; the handler
bench measured one (``ingest/handler/ck_path.py``) and it did not run faster here
(docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import aiokafka
import aiokafka.errors as Errors
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import ConnectionGroup, CoordinationType
from aiokafka.producer.sender import TxnOffsetCommitHandler
from aiokafka.protocol.abstract import AbstractType
from aiokafka.protocol.admin import DeleteGroupsRequest, DescribeGroupsRequest
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

SUPPORTED = "0.14."

# aiokafka's logger and message for a retried partition of a produce request
# (ingest/handler/retry_log.py counts them).
SENDER_LOGGER = "aiokafka.producer.sender"
PRODUCE_RETRY_MSG = "Got error produce response on topic-partition %s, retrying. Error: %s"
# aiokafka's logger and message for a topic its metadata request did not find: an ERROR at
# every metadata refresh (twice a second) for as long as a topic it writes to is gone.
CLUSTER_LOGGER = "aiokafka.cluster"
TOPIC_NOT_FOUND_MSG = "Topic %s not found in cluster metadata"

UNSTABLE_OFFSET_COMMIT = 88
# What the group coordinator answers a commit from a member that is no longer the
# partitions' owner: a stale generation, or a member already removed from the group.
_FENCING_ERRORS = (
    Errors.IllegalGenerationError,
    Errors.UnknownMemberIdError,
    Errors.RebalanceInProgressError,
)
_FENCED_INSTANCE_ID = 82
_ZERO_UUID = bytes(16)


def check_version() -> None:
    """Raise unless aiokafka is the release this module was written against."""
    if not aiokafka.__version__.startswith(SUPPORTED):
        raise RuntimeError(
            f"core/aiokafka_internals.py reaches into aiokafka {SUPPORTED}x; "
            f"aiokafka {aiokafka.__version__} is installed: review the module and its pin"
        )


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
        check_version()
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


# Requests aiokafka 0.14 does not define ------------------------------------------------------


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


class Uuid(AbstractType[bytes]):
    """Kafka's UUID wire type: 16 raw bytes."""

    @classmethod
    def encode(cls, value: bytes) -> bytes:
        assert len(value) == 16
        return value

    @classmethod
    def decode(cls, data: BytesIO) -> bytes:
        value = data.read(16)
        if len(value) != 16:
            raise ValueError("Buffer underrun decoding a UUID")
        return value


class MetadataResponse_v12(Response):
    API_KEY = 3
    API_VERSION = 12
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            CompactArray(
                ("node_id", Int32),
                ("host", CompactString("utf-8")),
                ("port", Int32),
                ("rack", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            CompactArray(
                ("error_code", Int16),
                ("name", CompactString("utf-8")),
                ("topic_id", Uuid),
                ("is_internal", Boolean),
                (
                    "partitions",
                    CompactArray(
                        ("error_code", Int16),
                        ("partition_index", Int32),
                        ("leader_id", Int32),
                        ("leader_epoch", Int32),
                        ("replica_nodes", CompactArray(Int32)),
                        ("isr_nodes", CompactArray(Int32)),
                        ("offline_replicas", CompactArray(Int32)),
                        ("tags", TaggedFields),
                    ),
                ),
                ("topic_authorized_operations", Int32),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class MetadataRequest_v12(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 3
    API_VERSION = 12
    RESPONSE_TYPE = MetadataResponse_v12
    SCHEMA = Schema(
        (
            "topics",
            CompactArray(
                ("topic_id", Uuid), ("name", CompactString("utf-8")), ("tags", TaggedFields)
            ),
        ),
        ("allow_auto_topic_creation", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class TopicMetadataV12(Request[MetadataRequest_v12]):
    API_KEY = 3

    def __init__(self, topic: str) -> None:
        self._topic = topic

    def build(self, request_struct_class: type[MetadataRequest_v12]) -> MetadataRequest_v12:
        return request_struct_class([(_ZERO_UUID, self._topic, {})], False, False, {})


# Consumer ------------------------------------------------------------------------------------


async def leave_group_now(consumer: AIOKafkaConsumer) -> None:
    """Send LeaveGroup and mark the group's coordinator unknown (ingest/handler/group_exit.py
    says when and why)."""
    check_version()
    coordinator = consumer._coordinator
    if coordinator is None:
        return
    await coordinator.maybe_leave_group()
    coordinator.coordinator_dead()


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, also after the broker went away.

    aiokafka 0.14's fetcher, closing, cancels a fetch that is waiting out its retry backoff
    and then awaits it bare: ``stop()`` raises that task's CancelledError whenever the
    broker was gone, and leaves the client open, its metadata task retrying for the life of
    the process. Here that CancelledError (the library's own task's) ends the close instead
    of the caller; one meant for the caller's task is raised as ever.
    """
    check_version()
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        fetcher = consumer._fetcher
        if fetcher is not None:
            left = [fetcher._fetch_task, *fetcher._pending_tasks]
            for t in left:
                t.cancel()
            await asyncio.gather(*left, return_exceptions=True)
        await consumer._client.close()


async def stop_producer(producer: AIOKafkaProducer, within_s: float) -> None:
    """``producer.stop()``, ended after ``within_s`` even with batches unsent.

    stop() first waits for every batch to be delivered, for ever for one bound for a topic
    deleted meanwhile. Cancelling it there leaves the sender running: a transactional
    one retries adding that topic to its transaction every retry backoff, until a newer
    producer with its transactional id fences it, and then fails the transaction's
    futures with nobody left to read them. Past ``within_s`` the sender is cancelled, the
    unsent batches fail (their futures carry the error to whoever reads them), and stop()
    goes on to close the connections.
    """
    check_version()
    stopping = asyncio.ensure_future(producer.stop())
    await asyncio.wait({stopping}, timeout=within_s)
    sender = producer._sender
    task = sender.sender_task if sender is not None else None
    if task is not None and not task.done():
        await sender.close()  # a cancelled sender fails nothing itself
        producer._message_accumulator.fail_all(
            Errors.KafkaError("the producer was closed with this batch unsent")
        )
    await stopping
    # stop() returns at once, closing nothing, after an earlier one was cut short.
    await producer.client.close()


async def fetch_offset(
    consumer: AIOKafkaConsumer, group_id: str, tp: TopicPartition, require_stable: bool
) -> tuple[int, int, str]:
    """One OffsetFetch v7 for ``tp``: (error code, committed offset or -1, metadata).

    Raises what the client raises for a node that cannot be reached."""
    check_version()
    client = consumer._client
    node_id = await client.coordinator_lookup(CoordinationType.GROUP, group_id)
    resp = await client.send(
        node_id, OffsetFetchV7(group_id, [tp], require_stable), group=ConnectionGroup.COORDINATION
    )
    code = resp.error_code
    for _, partitions, _ in resp.topics:
        for partition, offset, _, metadata, pcode, _ in partitions:
            if partition == tp.partition:
                return (pcode or code), offset, metadata or ""
    if code:
        return code, -1, ""
    raise Errors.KafkaError(f"offset fetch for {tp}: the answer does not name the partition")


async def open_transactions(consumer: AIOKafkaConsumer, prefix: str) -> set[str]:
    """The transactional ids starting with ``prefix`` whose transaction is open."""
    check_version()
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
    check_version()
    client = consumer._client
    node_id = await client.coordinator_lookup(CoordinationType.GROUP, group_id)
    resp = await client.send(node_id, DescribeGroupsRequest([group_id]))
    ((code, _, _, _, _, members, *_),) = resp.groups
    if code:
        raise Errors.for_code(code)(f"describe group {group_id!r}")
    return {client_id for _, client_id, *_ in members}


async def raw_topic_id(consumer: AIOKafkaConsumer, topic: str) -> bytes | None:
    """The topic's 16-byte id; None where it has none (all zeroes). Raises
    IncompatibleBrokerVersion or NotImplementedError where the broker predates
    Metadata v12."""
    check_version()
    client = consumer._client
    node_id = client.get_random_node()
    if node_id is None:
        await client.force_metadata_update()
        node_id = client.get_random_node()
    resp: Any = await client.send(node_id, TopicMetadataV12(topic))
    for code, name, raw_id, *_ in resp.topics:
        if name != topic:
            continue
        if code:
            raise Errors.for_code(code)(f"metadata of topic {topic!r}")
        return None if raw_id == _ZERO_UUID else bytes(raw_id)
    raise Errors.KafkaError(f"no metadata for topic {topic!r}")


async def delete_group(admin: AIOKafkaAdminClient, group_id: str) -> int:
    """Delete a consumer group through a started admin client: the broker's error code."""
    check_version()
    node = await admin.find_coordinator(group_id)
    resp = await admin._send_request_to_node(node, DeleteGroupsRequest([group_id]))
    return int(dict((g[0], g[1]) for g in resp.results)[group_id])


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
        check_version()
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

    def in_transaction(self) -> bool:
        return bool(self._txn_manager.is_in_transaction())

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
