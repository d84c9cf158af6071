"""The handler's producer and what it commits.

With exactly-once (the default) a poll's batches commit as one transaction:
ticks, dead letters and the input offsets (fencing.py says why a stale owner
cannot commit one). Without it, output first, then the offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from core.aiokafka_internals import stop_producer
from core.secrets import kafka_auth
from ingest.handler.fencing import FencedProducer, GroupMetadata
from ingest.handler.partition import Batch, PartitionWorker
from ingest.handler.settings import HandlerSettings
from ingest.kafka_metadata import throttle_metadata_updates

log = logging.getLogger(__name__)

# How long a discarded producer gets to close. Its unsent batches are of an abandoned
# transaction; with a topic gone they never send, and the close waits this out.
DISCARD_WAIT_S = 30.0


class Committer:
    """Owns the producer: opened, committed through, discarded after a failure."""

    def __init__(self, settings: HandlerSettings, txn_id: str, metadata: Callable[[], str]) -> None:
        self.s = settings
        self.txn_id = txn_id
        self._metadata = metadata  # what each offset commit carries (incarnation.py)
        self.producer: AIOKafkaProducer | None = None

    async def open(self) -> None:
        s = self.s
        if not s.eos:
            self.producer = AIOKafkaProducer(
                bootstrap_servers=s.bootstrap,
                **kafka_auth(),
                acks="all",
                enable_idempotence=True,
                linger_ms=2,
            )
        else:
            self.producer = FencedProducer(
                bootstrap_servers=s.bootstrap,
                **kafka_auth(),
                transactional_id=self.txn_id,
                enable_idempotence=True,
                acks="all",
                linger_ms=2,
                max_batch_size=512 * 1024,
                transaction_timeout_ms=s.transaction_timeout_ms,
                # Back-to-back transactions race the previous commit's markers; the
                # broker answers a produce in that window with a retriable
                # NOT_ENOUGH_REPLICAS (transaction verification, KIP-890). aiokafka's
                # default 100 ms backoff then dominated end-to-end latency.
                retry_backoff_ms=5,
            )
        # Its 5 ms retry backoff also paces metadata requests while a partition has no
        # leader: without this, a broker restart costs a core and a log line per retry.
        throttle_metadata_updates(self.producer, 0.5)
        await self.producer.start()

    @property
    def transactional(self) -> bool:
        return isinstance(self.producer, FencedProducer)

    async def discard(self, wait_s: float = DISCARD_WAIT_S) -> None:
        """Drop the producer after a failed transaction; ``open()`` makes the next. Its
        close is cut short after ``wait_s``.

        Not abort_transaction(): on an abortable error aiokafka forgets which
        partitions the transaction wrote to, then "aborts" it without telling the
        broker, and the next commit would commit the failed batch's output too. A
        new producer's InitProducerId makes the broker abort whatever it holds open
        for this transactional id; it also recovers a fenced one.
        """
        p, self.producer = self.producer, None
        if p is not None:
            with contextlib.suppress(Exception):
                await stop_producer(p, wait_s)

    def detach(self) -> tuple[AIOKafkaProducer | None, bool]:
        """The producer, handed over for closing, and whether it holds an open transaction."""
        p, self.producer = self.producer, None
        open_txn = isinstance(p, FencedProducer) and p.in_transaction()
        return p, open_txn

    async def commit(
        self,
        consumer: AIOKafkaConsumer,
        group: str,
        work: list[Batch],
        check: Awaitable[None] | None = None,
    ) -> None:
        """Commit batches together; raises what kept them from committing.

        ``check`` runs beside the sends and must pass before anything is committed: what
        it raises fails the commit (recovery.py: the input topic is still the incarnation
        the partitions were restored from)."""
        p = self.producer
        assert p is not None
        if isinstance(p, FencedProducer):
            meta = GroupMetadata.of(consumer, group)
            await p.begin_transaction()
            futures = [f for b in work for f in await b.worker.send(p, b)]
            await p.send_offsets_fenced(
                {b.worker.tp: OffsetAndMetadata(b.next_offset, self._metadata()) for b in work},
                meta,
            )
            # The commit waits for these anyway, but does not fail for every refused
            # produce: a record too large for its topic would commit the offsets
            # without it. Every outcome is read, so no refusal is left for asyncio to
            # report as never retrieved.
            for r in await asyncio.gather(*futures, return_exceptions=True):
                if isinstance(r, BaseException):
                    raise r
            if check is not None:
                await check
            await p.commit_transaction()
            return
        futures = [f for b in work for f in await b.worker.send(p, b)]
        await asyncio.gather(*futures)
        if check is not None:
            await check
        # At-least-once: offsets after the output is acknowledged.
        try:
            await consumer.commit({b.worker.tp: (b.next_offset, self._metadata()) for b in work})
        except KafkaError as e:
            log.warning("offset commit failed (%s); batch may repeat", e)

    async def probe(
        self, consumer: AIOKafkaConsumer, group: str, workers: list[PartitionWorker]
    ) -> bool:
        """Whether the broker takes a commit of the partitions' offsets as they stand.
        A refused probe discards the producer (``open()`` makes the next)."""
        p = self.producer
        assert p is not None
        try:
            if isinstance(p, FencedProducer):
                meta = GroupMetadata.of(consumer, group)
                await p.begin_transaction()
                await p.send_offsets_fenced(
                    {w.tp: OffsetAndMetadata(w.committed, self._metadata()) for w in workers},
                    meta,
                )
                await p.commit_transaction()
            else:
                await consumer.commit({w.tp: (w.committed, self._metadata()) for w in workers})
            return True
        except Exception as e:
            log.warning("the broker refuses an empty commit too (%r): not the record's fault", e)
            if isinstance(p, FencedProducer):
                await self.discard()
            return False
