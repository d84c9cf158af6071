"""A poll's commit and what follows a failed one.

A failed commit is aborted and its partitions rebuilt from their committed
offsets; repeated failures back off, and narrow the batch down until the record
that keeps failing is found and dead-lettered (poison.py), while a failure that
is not a record's (an outage) never dead-letters anything.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError

from core.incarnation import topic_id
from core.retry import backoff_s
from core.topology import TopicMissing, partition_ids
from ingest import metrics
from ingest.handler.commits import DISCARD_WAIT_S
from ingest.handler.denied import DENIED, Denials
from ingest.handler.partition import Batch, PartitionWorker
from ingest.handler.poison import PoisonTracker, may_be_the_records

if TYPE_CHECKING:
    from ingest.handler.service import FeedHandler

log = logging.getLogger(__name__)

# While a topic the handler writes to is missing, the line saying so comes this often.
_MISSING_SAID_EVERY_S = 60.0
# ... and the broker is asked this often whether it is back.
_BACK_CHECKED_EVERY_S = 5.0
# A commit still unfinished after this long is checked for a topic it writes to gone from
# the broker: the client retries such a topic silently until the transaction times out.
_STALL_CHECKED_AFTER_S = 3.0
# A discarded producer whose output topic is gone can never send its batches, which
# belong to an abandoned transaction anyway: its close is not waited out.
_DISCARD_WAIT_TOPIC_GONE_S = 1.0


class CommitTimeout(TimeoutError):
    """A commit did not finish before the broker would abort its transaction anyway.

    The case it exists for: the ticks (or dead-letter) topic deleted under the handler.
    The client then retries adding its partitions to the transaction for as long as the
    topic is gone, silently, and the commit would wait for ever.
    """


class OutputMissing(KafkaError):
    """A topic the handler writes to is not on the broker: the commit cannot succeed."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic} is not on the broker")
        self.topic = topic


class TopicRecreated(KafkaError):
    """The input topic was deleted and created again since its partitions were restored:
    their positions and books are of the old log. Nothing of the batch may be committed;
    every partition is restored from the new log (``core.incarnation``)."""

    def __init__(self, topic: str, was: str, now: str) -> None:
        super().__init__(f"topic {topic} has id {now}, its partitions were restored from {was}")
        self.topic, self.was, self.now = topic, was, now


class Recovery:
    """Commits one poll's batches for ``handler`` and recovers from a failed commit."""

    def __init__(self, handler: FeedHandler, poison_after: int) -> None:
        self.h = handler
        self._poison = PoisonTracker(poison_after)
        self._failed_in_a_row = 0  # failed commits since the last one that succeeded
        self._missing_said: dict[str, float] = {}  # output topic -> when its absence was said
        self._back_checked = 0.0  # monotonic time the broker was last asked if they are back
        # A batch with dead letters failed on the dead-letter topic's absence: its
        # partitions fetch that record again and again until the topic is back.
        self._dead_letters_wait = False
        self._denials = Denials()

    @property
    def holding(self) -> bool:
        """Whether the input is held until a topic is back (``hold``): the ticks topic,
        which every batch writes to, or the dead-letter topic, once a batch with dead
        letters failed on it (the poll's one transaction holds every partition's batch,
        so nothing of the poll could commit anyway)."""
        said = self._missing_said
        return self.h.s.out_topic in said or (
            self._dead_letters_wait and self.h.s.deadletter_topic in said
        )

    async def commit(self, work: list[Batch]) -> None:
        """Commit a poll's batches: one transaction with EOS, else output then offsets.

        A partition searched one record at a time for the record that keeps its
        commits failing (poison.py) commits alone, so that a failure is its own;
        the poll's batches then commit one after another.
        """
        groups = [[b] for b in work] if any(b.worker.one_at_a_time for b in work) else [work]
        for i, group in enumerate(groups):
            error = await self._commit_group(group)
            if isinstance(error, TopicRecreated):
                await self._follow_new_incarnation(error)
                return
            if error is not None:
                rest = [b for g in groups[i:] for b in g]
                await self._recover([b.worker.tp for b in rest], group, error)
                return
        self._failed_in_a_row = 0
        if self._denials.denied:
            self._denials.succeeded()
            if not self._missing_said:
                self.h.probes.unblock()
        if self._missing_said:
            await self._say_outputs_back()

    async def _say_outputs_back(self) -> None:
        """After a commit went through while an output topic was missing: say which are
        back. Asked of the broker, at most every few seconds: a poll whose records made
        no ticks commits its offsets alone, without the missing topic."""
        if not self._check_due():
            return
        try:
            await partition_ids(self.h.s.bootstrap, list(self._missing_said))
        except TopicMissing:
            return  # still gone: said once a minute by the failed commits
        except Exception as e:  # a broker away: asked again after the next commit
            log.debug("could not check the output topics: %r", e)
            return
        self._back(list(self._missing_said))

    def _check_due(self) -> bool:
        """Whether to ask the broker about the missing topics now: every few seconds."""
        now = time.monotonic()
        if now - self._back_checked < _BACK_CHECKED_EVERY_S:
            return False
        self._back_checked = now
        return True

    async def _same_incarnation(self) -> None:
        """Raise TopicRecreated unless the input topic still has the id its partitions were
        restored with. Deleted and created again between two of the group's metadata
        refreshes, it never looks missing and nobody rebalances: the consumer reads the
        new log on from the old one's positions, into the old day's books."""
        consumer, restorer = self.h.consumer, self.h.restorer
        if consumer is None or restorer is None or restorer.topic_id is None:
            return
        # A topic deleted and not yet back raises here: the commit fails and is retried
        # like any failed one, until the group takes the partitions away.
        now = await topic_id(consumer, self.h.s.in_topic)
        if now is not None and now != restorer.topic_id:
            raise TopicRecreated(self.h.s.in_topic, restorer.topic_id, now)

    async def _follow_new_incarnation(self, e: TopicRecreated) -> None:
        """Abort the batch and restore every partition from the new log: committed offsets
        and snapshots of the old one are ignored there (restore.py)."""
        assert self.h.consumer is not None
        log.warning(
            "%s was deleted and created again (topic id %s, was %s): the batch is aborted "
            "and every partition restored from the new log", e.topic, e.now, e.was,
        )  # fmt: skip
        await self._recover(sorted(self.h.consumer.assignment()))

    async def _commit_group(self, work: list[Batch]) -> Exception | None:
        """Commit batches together; the error if they could not be."""
        assert self.h.consumer is not None
        t0 = time.monotonic()
        # Beside the sends, so it costs no time on the commit's path.
        check = asyncio.ensure_future(self._same_incarnation())
        try:
            try:
                await self._bounded(work, check)
            finally:
                check.cancel()
                await asyncio.gather(check, return_exceptions=True)  # its outcome, read
        except Exception as e:  # any failure leaves state ahead of the commit
            metrics.TXN_ABORTS.labels(type(e).__name__).inc()
            log.warning(
                "batch of partitions %s at offsets %s failed (%r); aborting and restoring",
                sorted(b.worker.tp.partition for b in work),
                sorted(b.worker.committed for b in work),
                e,
            )
            if isinstance(e, CommitTimeout | UnknownTopicOrPartitionError | OutputMissing):
                await self._say_missing_outputs()
            elif self._denials.failed(e):
                self.h.probes.block(f"the broker refuses its commits: {e!r}", 2 * 60.0)
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

    async def _bounded(self, work: list[Batch], check: Awaitable[None]) -> None:
        """The commit, given up after the transaction timeout (CommitTimeout). One still
        running after ``_STALL_CHECKED_AFTER_S`` starts a check of the output topics that
        ends it at once if one is gone (OutputMissing); a commit of the usual few
        milliseconds costs only the timer."""
        assert self.h.consumer is not None
        limit_s = self.h.s.transaction_timeout_ms / 1000
        missing: list[str] = []
        watch: list[asyncio.Task[None]] = []
        try:
            async with asyncio.timeout(limit_s) as deadline:
                timer = asyncio.get_running_loop().call_later(
                    _STALL_CHECKED_AFTER_S,
                    lambda: watch.append(asyncio.ensure_future(self._watch(deadline, missing))),
                )
                try:
                    await self.h.committer.commit(self.h.consumer, self.h.s.group, work, check)
                finally:
                    timer.cancel()
        except TimeoutError:
            if missing:
                raise OutputMissing(missing[0]) from None
            raise CommitTimeout(f"the commit did not finish within {limit_s:g} s") from None
        finally:
            for t in watch:
                t.cancel()
            await asyncio.gather(*watch, return_exceptions=True)

    async def _watch(self, deadline: asyncio.Timeout, missing: list[str]) -> None:
        """Ask the broker for the output topics until one is found gone: name it in
        ``missing`` and end the commit now. A broker that does not answer is not a missing
        topic: asked again later."""
        s = self.h.s
        while True:
            try:
                await partition_ids(s.bootstrap, [s.out_topic, s.deadletter_topic])
            except TopicMissing as e:
                missing.append(e.topic)
                deadline.reschedule(asyncio.get_running_loop().time())
                return
            except Exception as e:
                log.debug("could not check the output topics: %r", e)
            await asyncio.sleep(_BACK_CHECKED_EVERY_S)

    async def hold(self, consumer: AIOKafkaConsumer) -> None:
        """While a topic the input waits for is gone (``holding``): fetch nothing (the
        partitions stay paused, the member stays in its group) and ask the broker every few
        seconds; once it is back, say so and fetch again. No transaction is begun meanwhile,
        so the client does not spin on the missing topic and nothing is restored over and
        over."""
        consumer.pause(*consumer.assignment())  # the group may have given new ones since
        if not self._check_due():
            return
        await self._say_missing_outputs()
        if not self.holding:
            consumer.resume(*consumer.paused())  # nothing else pauses partitions

    async def _say_missing_outputs(self) -> None:
        """Name a topic the handler writes to that is not on the broker (deleted under it):
        the one line an operator needs, once a minute while it lasts. The failed commit is
        retried with backoff as ever; nothing is committed, so the input is held."""
        s = self.h.s
        try:
            await partition_ids(s.bootstrap, [s.out_topic, s.deadletter_topic])
        except TopicMissing as e:
            if e.topic != s.out_topic and s.out_topic in self._missing_said:
                self._back([s.out_topic])  # asked first, so it is there
            # Until the next failed commit or check could renew it: the commit's limit,
            # the discarded producer's close, the longest backoff before the next, a margin.
            renew_s = s.transaction_timeout_ms / 1000 + DISCARD_WAIT_S + s.retry_backoff_max_s + 10
            self.h.probes.block(f"topic {e.topic} is not on the broker", renew_s)
            now = time.monotonic()
            said = self._missing_said.get(e.topic)
            if said is None or now - said >= _MISSING_SAID_EVERY_S:
                self._missing_said[e.topic] = now
                log.warning(
                    "topic %s is not on the broker (deleted?): the handler holds its input, "
                    "commits nothing and retries until it is back", e.topic,
                )  # fmt: skip
            return
        except Exception as e:  # a broker away: the retries below ride it out
            log.debug("could not check the output topics: %r", e)
            return
        self._back(list(self._missing_said))

    def _back(self, topics: list[str]) -> None:
        for topic in topics:
            log.warning("topic %s is back on the broker: commits go on", topic)
            del self._missing_said[topic]
            if topic == self.h.s.deadletter_topic:
                self._dead_letters_wait = False
        if not self._missing_said:
            self.h.probes.unblock()

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
        if failed and self.h.s.deadletter_topic in self._missing_said:
            self._dead_letters_wait = any(b.dead for b in failed)
        if failed:
            self._failed_in_a_row += 1
            n = self._failed_in_a_row
            if isinstance(error, DENIED):  # until the grant is made: see denied.py
                wait = self._denials.wait_s(n)
            else:
                wait = 0 if n <= 1 else backoff_s(n - 1, 0.25, self.h.s.retry_backoff_max_s)
            await self.h.grace.pause(wait)
        if self.h.committer.transactional:
            gone = isinstance(error, OutputMissing) or self.holding
            await self.h.committer.discard(_DISCARD_WAIT_TOPIC_GONE_S if gone else DISCARD_WAIT_S)
            await self.h.retry("reopen the producer", self.h.committer.open)
            if self.h.probes.fatal is not None:
                return
        for b in failed or ():
            # A lone record's failure is only its own if the error can be a record's
            # and the broker takes a commit without it: an outage must never
            # dead-letter good records.
            lone = b.worker.one_at_a_time and len(b.records) == 1
            if (
                error is not None
                and not isinstance(error, DENIED)
                and (not lone or (may_be_the_records(error) and await self._probe([b.worker])))
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
