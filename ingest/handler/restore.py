"""Taking a partition on: where its state starts, and that state rebuilt.

The start is the group's committed offset of this incarnation of the topic,
read once no open transaction holds a newer one. An owner killed or frozen
mid-transaction would hold it until the transaction timeout, so a wait that
lasts fences the group's transactions whose owners have left the group.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from core.incarnation import judge_committed, offset_metadata, topic_id
from core.secrets import kafka_auth
from ingest import metrics
from ingest.handler.fencing import Committed, Unstable, fetch_committed, stale_transactions
from ingest.handler.partition import Outputs, PartitionWorker
from ingest.handler.redis_sink import RedisSink
from ingest.handler.settings import HandlerSettings

log = logging.getLogger(__name__)


def transactional_id(group: str, handler_id: str) -> str:
    """The handler's producer. Its consumer's client id is the handler id, so the
    group's membership tells which open transactions have lost their owner
    (``stale_transactions``); its offset commits name it too, for whoever reads
    the offsets."""
    return f"tickscale.{group}.{handler_id}"


class Stopping(Exception):
    """The handler is stopping: a partition's restore is given up."""


async def fence(bootstrap: str, txn_id: str) -> None:
    """Initialising a producer with ``txn_id`` aborts its open transaction and
    makes its current holder's next transactional request fail."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, **kafka_auth(), transactional_id=txn_id)
    await p.start()
    await p.stop()


class Restorer:
    """Opens the workers of the partitions assigned to one handler."""

    def __init__(
        self,
        settings: HandlerSettings,
        outputs: Outputs,
        sink: RedisSink | None,
        stop: asyncio.Event,
    ) -> None:
        self.s = settings
        self.txn_id = transactional_id(settings.group, settings.handler_id)
        self.outputs = outputs
        self.sink = sink
        self._stop = stop
        # What each offset commit carries: the transactional id and the input topic's
        # id, learnt on assignment (before any commit).
        self.topic_id: str | None = None
        self.offset_metadata = offset_metadata(self.txn_id, None)
        self._fence_lock = asyncio.Lock()

    async def open(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> PartitionWorker:
        """The partition's worker, its state restored up to its start offset."""
        s = self.s
        w = PartitionWorker(tp, s.group, self.outputs, self.sink, s.snapshot_interval_s)
        # Asked at every assignment: a topic deleted and created again while this
        # handler ran is a new incarnation.
        tid = await topic_id(consumer, tp.topic)
        if tid != self.topic_id:
            self.topic_id = tid
            self.offset_metadata = offset_metadata(self.txn_id, tid)
        got = await self.committed(consumer, tp)
        log_end = (await consumer.end_offsets([tp]))[tp]
        verdict = judge_committed(got.offset, got.metadata, tid, log_end)
        if verdict.foreign:
            log.warning(
                "%s: ignoring the committed offset %s: %s (state of another incarnation of "
                "the topic); starting from the log start",
                tp,
                got.offset,
                verdict.foreign,
            )
        await w.restore(s.bootstrap, verdict.offset, tid, self._stop)
        return w

    async def committed(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> Committed:
        """The partition's committed offset, once no open transaction holds a newer one.

        The previous owner commits its batch in flight before it gives a partition
        up, so the wait is normally one commit; every ``fence_after_s`` of waiting,
        the group's handlers that hold a transaction open outside the group are
        fenced, which aborts those transactions at once.
        """
        s = self.s
        if not s.eos:
            return await fetch_committed(consumer, s.group, tp, require_stable=False)
        t0 = time.monotonic()
        check_at = t0 + s.fence_after_s
        while True:
            if self._stop.is_set():
                # stop() waits for the assignment callback; the partition's next owner
                # reads the offset instead.
                raise Stopping(f"{tp}: stopped while its offset was unstable")
            try:
                return await fetch_committed(consumer, s.group, tp, require_stable=True)
            except Unstable:
                pass
            if time.monotonic() >= check_at:
                await self._fence_stale(consumer, tp, time.monotonic() - t0)
                check_at = time.monotonic() + s.fence_after_s
            await asyncio.sleep(0.02)

    async def _fence_stale(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, waited: float
    ) -> None:
        # Partitions assigned together wait together: one lists and fences, and the
        # others' lists then show those transactions aborted.
        async with self._fence_lock:
            group = self.s.group
            try:
                stale = await stale_transactions(consumer, group, transactional_id(group, ""))
                for txn_id in sorted(stale - {self.txn_id}):
                    log.warning(
                        "%s: %s holds a transaction open outside the group after %.1fs; fencing it",
                        tp,
                        txn_id,
                        waited,
                    )
                    metrics.STALE_TXN_FENCED.inc()
                    await fence(self.s.bootstrap, txn_id)
            except KafkaError as e:  # e.g. a coordinator still loading: the next check
                log.warning("%s: cannot fence the open transactions (%r)", tp, e)
