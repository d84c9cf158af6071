"""A poll's commit and what follows a failed one.

A failed commit is aborted and its partitions rebuilt from their committed
offsets; repeated failures back off, and narrow the batch down until the record
that keeps failing is found and dead-lettered (poison.py), while a failure that
is not a record's (an outage) never dead-letters anything.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING

from aiokafka import TopicPartition

from core.retry import backoff_s
from ingest import metrics
from ingest.handler.partition import Batch, PartitionWorker
from ingest.handler.poison import PoisonTracker, may_be_the_records

if TYPE_CHECKING:
    from ingest.handler.service import FeedHandler

log = logging.getLogger(__name__)


class Recovery:
    """Commits one poll's batches for ``handler`` and recovers from a failed commit."""

    def __init__(self, handler: FeedHandler, poison_after: int) -> None:
        self.h = handler
        self._poison = PoisonTracker(poison_after)
        self._failed_in_a_row = 0  # failed commits since the last one that succeeded

    async def commit(self, work: list[Batch]) -> None:
        """Commit a poll's batches: one transaction with EOS, else output then offsets.

        A partition searched one record at a time for the record that keeps its
        commits failing (poison.py) commits alone, so that a failure is its own;
        the poll's batches then commit one after another.
        """
        groups = [[b] for b in work] if any(b.worker.one_at_a_time for b in work) else [work]
        for i, group in enumerate(groups):
            error = await self._commit_group(group)
            if error is not None:
                rest = [b for g in groups[i:] for b in g]
                await self._recover([b.worker.tp for b in rest], group, error)
                return
        self._failed_in_a_row = 0

    async def _commit_group(self, work: list[Batch]) -> Exception | None:
        """Commit batches together; the error if they could not be."""
        assert self.h.consumer is not None
        t0 = time.monotonic()
        try:
            await self.h.committer.commit(self.h.consumer, self.h.s.group, work)
        except Exception as e:  # any failure leaves state ahead of the commit
            metrics.TXN_ABORTS.labels(type(e).__name__).inc()
            log.warning(
                "batch of partitions %s at offsets %s failed (%r); aborting and restoring",
                sorted(b.worker.tp.partition for b in work),
                sorted(b.worker.committed for b in work),
                e,
            )
            return e
        done = time.time()
        for b in work:
            b.worker.committed_batch(b, done)
            self.h.meter.messages += len(b.records)
            self._poison.committed(b.worker.tp, b.next_offset)
            if b.worker.one_at_a_time:
                # The poll's later records were dropped from the batch: fetch them again.
                self.h.consumer.seek(b.worker.tp, b.next_offset)
                b.worker.one_at_a_time = self._poison.one_at_a_time(b.worker.tp, b.next_offset)
                b.worker.condemned = self._poison.condemned(b.worker.tp)
                b.worker.bare = self._poison.bare(b.worker.tp)
        metrics.PROCESSING.observe(time.monotonic() - t0)
        return None

    async def _recover(
        self,
        tps: list[TopicPartition],
        failed: list[Batch] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Abort, then rebuild the partitions from their committed offsets.

        ``failed`` are the batches whose commit raised ``error``: repeated failures
        back off, and count towards finding a poison record (poison.py).
        """
        assert self.h.consumer is not None
        if failed:
            self._failed_in_a_row += 1
            n = self._failed_in_a_row
            wait = 0 if n <= 1 else backoff_s(n - 1, 0.25, self.h.s.retry_backoff_max_s)
            await self.h.grace.pause(wait)
        if self.h.committer.transactional:
            await self.h.committer.discard()
            await self.h.retry("reopen the producer", self.h.committer.open)
            if self.h.probes.fatal is not None:
                return
        for b in failed or ():
            # A lone record's failure is only its own if the error can be a record's
            # and the broker takes a commit without it: an outage must never
            # dead-letter good records.
            lone = b.worker.one_at_a_time and len(b.records) == 1
            if error is not None and (
                not lone or (may_be_the_records(error) and await self._probe([b.worker]))
            ):
                self._poison.failed(b.worker.tp, b.worker.committed, b.next_offset, error)
        for tp in tps:
            self.h.close_worker(tp)
            if tp in self.h.consumer.assignment():
                await self.h.retry(f"restore {tp}", functools.partial(self.h.open_worker, tp))
                w = self.h.workers.get(tp)
                if w is None:
                    continue
                w.one_at_a_time = self._poison.one_at_a_time(tp, w.committed)
                w.condemned = self._poison.condemned(tp)
                w.bare = self._poison.bare(tp)
                if w.one_at_a_time:
                    log.warning(
                        "%s keeps failing at offset %d: committing one record at a time%s",
                        tp,
                        w.committed,
                        f"; dead-lettering offsets {sorted(w.condemned)}" if w.condemned else "",
                    )

    async def _probe(self, workers: list[PartitionWorker]) -> bool:
        """Whether the broker takes a commit of the partitions' offsets as they stand."""
        assert self.h.consumer is not None
        if await self.h.committer.probe(self.h.consumer, self.h.s.group, workers):
            return True
        if self.h.committer.producer is None:
            await self.h.retry("reopen the producer", self.h.committer.open)
        return False
