"""Lag of the handler group on the raw topic, measured from the broker itself.

Per partition: lag = log-end offset - committed offset; a partition the group
never committed counts from its log-start offset (everything in it is still
unprocessed). So does one whose committed offset belongs to an earlier
incarnation of the topic (``core.incarnation``): the handlers ignore such an
offset and start from the log start, and the backlog the fleet is sized for
begins there too. Lag in seconds is the age of the oldest unprocessed record: the
time the log-end offset passed the committed offset, interpolated from the
(time, end offset) points this probe has recorded, or, when the committed
offset is older than that history (a scaler that just started), the record's
own broker timestamp, fetched once and cached.

The rates are the smoothed deltas of the summed end offsets (ingest) and the
summed committed offsets (processing) between polls.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from core.aiokafka_internals import stop_consumer
from core.incarnation import judge_committed, topic_id
from core.secrets import kafka_auth
from scaler.signals import Ewma, PartitionLag, Snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupInfo:
    state: str  # Empty, Stable, PreparingRebalance, CompletingRebalance, Dead
    members: int
    clients: frozenset[str] = frozenset()  # the members' client ids (handlers: their names)


class _EndHistory:
    """When one partition's log-end offset took each value this probe saw.

    For every distinct end offset: the first and the last poll it was seen at.
    A record at offset o with end[i-1] <= o < end[i] was appended after the
    last sighting of end[i-1] and by the first sighting of end[i]; its time is
    interpolated inside that interval, so a quiet spell before a burst does not
    make the burst look old.
    """

    def __init__(self, horizon_s: float) -> None:
        self.horizon_s = horizon_s
        self.first: deque[float] = deque()
        self.last: deque[float] = deque()
        self.ends: deque[int] = deque()

    def add(self, t: float, end: int) -> None:
        if self.ends and end == self.ends[-1]:
            self.last[-1] = t
            return
        self.first.append(t)
        self.last.append(t)
        self.ends.append(end)
        # Keep one point older than the horizon, so an offset at the edge still dates.
        while len(self.ends) > 2 and self.last[1] < t - self.horizon_s:
            self.first.popleft()
            self.last.popleft()
            self.ends.popleft()

    def time_of(self, offset: int) -> float | None:
        """When the record at ``offset`` was appended, or None if outside the history."""
        ends = list(self.ends)
        i = bisect.bisect_right(ends, offset)  # first point past ``offset``
        if i == 0 or i >= len(ends):
            return None
        t0, e0, t1, e1 = self.last[i - 1], ends[i - 1], self.first[i], ends[i]
        return t0 + (t1 - t0) * (offset - e0 + 1) / max(e1 - e0, 1)


class LagProbe:
    """Reads offsets, group state and record timestamps; one ``measure()`` per poll.

    :param history_s: how long end-offset points are kept for dating lag.
    :param rate_halflife_s: smoothing of the ingest and processing rates.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        history_s: float = 900.0,
        rate_halflife_s: float = 5.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self.history_s = history_s
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._hist: dict[int, _EndHistory] = {}
        self._ts_cache: dict[tuple[int, int], float] = {}
        self._ingest = Ewma(rate_halflife_s)
        self._process = Ewma(rate_halflife_s)
        self._last: tuple[float, int, int] | None = None  # time, sum(end), sum(committed)
        # partition -> the foreign commit last reported, so each is said once.
        self._foreign_said: dict[int, tuple[int, str]] = {}

    async def start(self) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **kafka_auth())
        await self._admin.start()
        # No group: this consumer only reads offsets and, rarely, one record.
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            **kafka_auth(),
            enable_auto_commit=False,
            max_partition_fetch_bytes=64 * 1024,
        )
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await stop_consumer(self._consumer)
        if self._admin is not None:
            await self._admin.close()

    async def __aenter__(self) -> LagProbe:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def partitions(self) -> list[TopicPartition]:
        assert self._admin is not None
        # Asked every poll: partitions added to the topic count from the next poll.
        parts: set[int] = set()
        for t in await self._admin.describe_topics([self.topic]):
            if t.get("topic") == self.topic and not t.get("error_code"):
                parts |= {int(p["partition"]) for p in t.get("partitions", [])}
        return [TopicPartition(self.topic, p) for p in sorted(parts)]

    async def group_info(self) -> GroupInfo:
        assert self._admin is not None
        resp = await self._admin.describe_consumer_groups([self.group])
        for r in resp:
            for g in r.to_object()["groups"]:
                if g["group"] == self.group:
                    ids = frozenset(str(m["client_id"]) for m in g["members"])
                    return GroupInfo(str(g["state"]), len(g["members"]), ids)
        return GroupInfo("Dead", 0)

    async def committed(self) -> dict[int, tuple[int, str]]:
        """Partition -> (committed offset, its commit metadata)."""
        assert self._admin is not None
        offs = await self._admin.list_consumer_group_offsets(self.group)
        return {
            tp.partition: (om.offset, om.metadata or "")
            for tp, om in offs.items()
            if tp.topic == self.topic and om.offset >= 0
        }

    def _this_incarnation(
        self, p: int, got: tuple[int, str] | None, tid: str | None, end: int
    ) -> int | None:
        """The committed offset if it belongs to this incarnation of the topic, else None
        (counted from the log start, as the handlers will). Judged as the handlers judge
        it, and said once per foreign commit."""
        if got is None:
            return None
        verdict = judge_committed(got[0], got[1], tid, end)
        if not verdict.foreign:
            self._foreign_said.pop(p, None)
            return verdict.offset
        if self._foreign_said.get(p) != got:
            self._foreign_said[p] = got
            log.warning(
                "%s-%d: the group's committed offset %d is from an earlier incarnation of "
                "the topic (%s): its lag counts from the log start until a handler commits",
                self.topic, p, got[0], verdict.foreign,
            )  # fmt: skip
        return None

    async def measure(self) -> Snapshot:
        assert self._consumer is not None
        tps = await self.partitions()
        if not tps:
            raise KafkaError(f"topic {self.topic!r} has no partitions (does it exist?)")
        # Committed offsets first, log ends after: a log end only grows, so a commit
        # the group makes between the two reads can never lie beyond the end read
        # here, and "beyond the log end" keeps meaning "from another incarnation".
        # Read together, a busy fleet's live position looked foreign and its whole
        # log counted as lag.
        committed, info, tid = await asyncio.gather(
            self.committed(), self.group_info(), topic_id(self._consumer, self.topic)
        )
        starts, ends = await self._offsets(tps)
        now = time.time()
        rows: list[PartitionLag] = []
        for tp in tps:
            p = tp.partition
            end, start = ends[tp], starts[tp]
            hist = self._hist.setdefault(p, _EndHistory(self.history_s))
            hist.add(now, end)
            c = self._this_incarnation(p, committed.get(p), tid, end)
            # A committed offset below the log start (retention trimmed it) resumes
            # at the start: that is where the backlog begins.
            frm = start if c is None else max(c, start)
            lag = max(0, end - frm)
            lag_s = 0.0
            if lag > 0:
                t = hist.time_of(frm)
                if t is None:
                    t = await self._record_time(tp, frm)
                lag_s = max(0.0, now - t) if t is not None else 0.0
            rows.append(PartitionLag(p, start, end, c, lag, lag_s))
        sum_end = sum(r.end_offset for r in rows)
        sum_com = sum(r.end_offset - r.lag for r in rows)
        ingest = self._ingest.value or 0.0
        process = self._process.value or 0.0
        if self._last is not None:
            t0, e0, c0 = self._last
            dt = now - t0
            if dt > 0:
                ingest = self._ingest.update(max(0, sum_end - e0) / dt, dt)
                process = self._process.update(max(0, sum_com - c0) / dt, dt)
        self._last = (now, sum_end, sum_com)
        self._trim_cache(rows)
        return Snapshot(
            time=now,
            partitions=tuple(rows),
            lag_msgs=sum(r.lag for r in rows),
            lag_s=max((r.lag_s for r in rows), default=0.0),
            ingest_rate=ingest,
            process_rate=process,
            members=info.members,
            group_state=info.state,
        )

    async def _offsets(
        self, tps: list[TopicPartition]
    ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        assert self._consumer is not None
        starts, ends = await asyncio.gather(
            self._consumer.beginning_offsets(tps), self._consumer.end_offsets(tps)
        )
        return starts, ends

    async def _record_time(self, tp: TopicPartition, offset: int) -> float | None:
        """Broker timestamp (s) of the record at ``offset``; cached, None if unreadable."""
        key = (tp.partition, offset)
        if key in self._ts_cache:
            return self._ts_cache[key]
        c = self._consumer
        assert c is not None
        ts: float | None = None
        try:
            c.assign([tp])
            c.seek(tp, offset)
            recs: dict[Any, list[Any]] = await c.getmany(tp, timeout_ms=2000, max_records=1)
            for r in recs.get(tp, []):
                ts = r.timestamp / 1000.0
        except KafkaError as e:
            log.debug("cannot read the record at %s@%d: %s", tp, offset, e)
        finally:
            with contextlib.suppress(Exception):
                c.unsubscribe()
        if ts is not None:
            self._ts_cache[key] = ts
        return ts

    def _trim_cache(self, rows: list[PartitionLag]) -> None:
        live = {(r.partition, r.end_offset - r.lag) for r in rows}
        for k in [k for k in self._ts_cache if k not in live]:
            del self._ts_cache[k]
