"""Checks ``md.ticks`` against a replay manifest: the no-loss ledger.

Reads the tick topic with ``read_committed`` (what any correct consumer sees)
and, per symbol, counts ticks missing (expected sequence numbers never seen),
duplicated (a sequence number seen again), reordered (a sequence number below
one already seen) and compares a checksum over the first occurrence of each
tick in arrival order with the manifest's, so content and order are both
covered. Dead letters are counted against the manifest too.

The expectations can also come from the source file itself
(``expect_from_source``): the replay's own message stream through the same
normaliser, so a stream the replay corrupted cannot vouch for itself, and each
expected dead letter is named by its place in the file and looked for, by its
bytes, on the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from core.aiokafka_internals import stop_consumer
from core.client_log import MISSING_TOPICS
from core.constants import HDR_DATE, HDR_DL_OFFSET, HDR_DL_PARTITION, HDR_DL_TOPIC
from core.incarnation import topic_id
from core.reach import Outage, reach_topics
from core.secrets import kafka_auth
from core.topology import TopicMissing, partitions_of
from ingest.codecs import itch
from ingest.manifest import Manifest, ManifestBuilder
from ingest.normalize import midnight_ns
from ingest.replay.source import RawMessage
from ingest.ticks import SymbolLedger


@dataclass
class SymbolCheck:
    seen: bytearray = field(default_factory=bytearray)
    ledger: SymbolLedger = field(default_factory=SymbolLedger)
    max_seq: int = 0
    duplicated: int = 0
    reordered: int = 0

    def add(self, tick: dict[str, Any]) -> None:
        seq = int(tick["seq"])
        if seq >= len(self.seen):
            self.seen.extend(b"\0" * max(seq + 1 - len(self.seen), len(self.seen)))
        if self.seen[seq]:
            self.duplicated += 1
            return
        self.seen[seq] = 1
        if seq < self.max_seq:
            self.reordered += 1
        else:
            self.max_seq = seq
        self.ledger.add(tick)


@dataclass
class ExpectedDeadLetter:
    """A source record the handlers must dead-letter (``copies`` times: market-wide
    records go to every partition)."""

    payload: bytes
    reason: str
    broadcast: bool
    where: str = "?"  # its place in the source file, once located
    copies: int = 1
    delivered: int = 0

    def line(self) -> str:
        return (
            f"dead letter {self.where}: {len(self.payload)} bytes, {self.reason}, "
            f"delivered {self.delivered} of {self.copies}"
        )


@dataclass
class SourceExpectation:
    """What a source file must produce: the manifest it implies and its dead letters."""

    manifest: Manifest
    deadletters: list[ExpectedDeadLetter]

    def set_partitions(self, raw_partitions: int) -> None:
        """Count market-wide dead letters once per raw partition."""
        for d in self.deadletters:
            d.copies = raw_partitions if d.broadcast else 1
        self.manifest.deadletters_expected = sum(d.copies for d in self.deadletters)


def expect_from_source(
    messages: Iterable[RawMessage], codec: str, day: str, source: str
) -> SourceExpectation:
    """Run the handlers' normaliser over what the replay of a source sends.

    :param messages: the replay's message stream of the file (same subset and window)
    :param codec: "itch" or "json"
    :param day: trading date the replay stamps on ITCH records
    :raises SourceError: the file is cut short (from the framing)
    """
    builder = ManifestBuilder()
    dls: list[ExpectedDeadLetter] = []
    seen: Counter[str] = Counter()
    for m in messages:
        builder.observe(m.payload, codec, day, 1)
        if builder.deadletters.total() != len(dls):
            reason = next(r for r, n in builder.deadletters.items() if n != seen[r])
            seen[reason] += 1
            dls.append(ExpectedDeadLetter(m.payload, reason, m.key is None))
    manifest = builder.build(source=source, topic="", partitions=0)
    if codec == "itch":
        manifest.params["date"] = day  # only this day's ticks are judged
    return SourceExpectation(manifest, dls)


def locate_deadletters(path: str | Path, codec: str, dls: list[ExpectedDeadLetter]) -> None:
    """Name each expected dead letter by its place in the file (ITCH: byte offset in
    the decompressed stream; JSON lines: line number).

    Dead letters are a subsequence of the file's records, so one pass matching
    them in order finds them; one the replay made up (a window's snapshot) stays
    unnamed.
    """
    if not dls:
        return
    i = 0
    name = Path(path).name
    if codec == "itch":
        with itch.open_itch_file(path) as f:
            unit = " (decompressed)" if isinstance(f, gzip.GzipFile) else ""
            for off, payload in itch.iter_records(f, name=str(path)):
                if payload == dls[i].payload:
                    dls[i].where = f"{name} @ byte {off}{unit}"
                    i += 1
                    if i == len(dls):
                        return
    else:
        with Path(path).open("rb") as f:
            for no, line in enumerate(f, 1):
                if line.strip() == dls[i].payload:
                    dls[i].where = f"{name} line {no}"
                    i += 1
                    if i == len(dls):
                        return


@dataclass
class VerifyResult:
    missing: int = 0
    duplicated: int = 0
    reordered: int = 0
    checksum_mismatch: int = 0
    unexpected_symbols: int = 0
    # Records of the tick topic that are not ticks (not JSON, or without a symbol or a
    # sequence number, or judging an ITCH day, an event time): any consumer of the topic
    # would stumble on them.
    unreadable: int = 0
    ticks_read: int = 0
    ticks_expected: int = 0
    # Ticks of other trading days (an ITCH manifest's topic holds every day the
    # handlers ran through): read, not judged.
    ticks_other_days: int = 0
    deadletters: int | None = None
    deadletters_expected: int = 0
    per_symbol: dict[str, dict[str, int | bool]] = field(default_factory=dict)
    # With expectations from the source: each expected dead letter, and whether it came.
    deadletter_spans: list[ExpectedDeadLetter] | None = None

    @property
    def ok(self) -> bool:
        dl_ok = self.deadletters is None or (
            self.deadletters == self.deadletters_expected
            and all(d.delivered == d.copies for d in self.deadletter_spans or ())
        )
        return (
            self.missing == 0
            and self.duplicated == 0
            and self.reordered == 0
            and self.checksum_mismatch == 0
            and self.unexpected_symbols == 0
            and self.unreadable == 0
            and dl_ok
        )

    def summary_line(self) -> str:
        return (
            f"missing={self.missing} duplicated={self.duplicated} "
            f"reordered={self.reordered} checksum_mismatch={self.checksum_mismatch}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ledger_ok": self.ok,
            "missing": self.missing,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "checksum_mismatch": self.checksum_mismatch,
            "unexpected_symbols": self.unexpected_symbols,
            "unreadable": self.unreadable,
            "ticks_read": self.ticks_read,
            "ticks_expected": self.ticks_expected,
            "ticks_other_days": self.ticks_other_days,
            "deadletters": self.deadletters,
            "deadletters_expected": self.deadletters_expected,
            "deadletter_spans": None
            if self.deadletter_spans is None
            else [
                {
                    "where": d.where,
                    "bytes": len(d.payload),
                    "reason": d.reason,
                    "expected": d.copies,
                    "delivered": d.delivered,
                }
                for d in self.deadletter_spans
            ],
        }


# How long one look at the end offsets may take before the broker counts as away: a broker
# that is there answers in milliseconds.
_PROBE_S = 5.0
# A topic found missing mid-read is asked about again this long after, before the read
# ends on it: a broker just restarted may answer before its metadata has caught up.
_RECHECK_S = 2.0


class TopicGone(Exception):
    """The topic was deleted while it was being read: nothing can be concluded from what
    was read of it, and waiting for the broker would not bring it back."""

    def __init__(self, topic: str, setting: str, recreated: bool = False) -> None:
        self.where = f"{setting} {topic}"
        how = "deleted and created again" if recreated else "deleted"
        self.what = (
            f"was {how} while verify read it; nothing was concluded (the ticks it held are "
            "gone with it)"
        )
        super().__init__(f"{self.where}: {self.what}")


async def _gone(bootstrap: str, topic: str) -> bool:
    """Whether the broker answers, twice, that ``topic`` is not there (not: no answer)."""
    for attempt in range(2):
        if attempt:
            await asyncio.sleep(_RECHECK_S)
        try:
            async with asyncio.timeout(_PROBE_S):
                await partitions_of(bootstrap, topic)
            return False
        except TopicMissing:
            continue
        except (KafkaError, OSError, TimeoutError):
            return False
    return True


async def _read_topic(
    bootstrap: str,
    topic: str,
    on_record: Callable[[Any], bool],
    expected: int | None,
    waits: tuple[float, float, float],
    setting: str = "--topic",
) -> int:
    """Read a topic from the start with read_committed (``setting`` names it); returns how
    many records ``on_record`` counted (returned true for).

    ``waits`` is (timeout, idle, outage) seconds. Stops at the end offsets when the timeout
    is 0; otherwise keeps polling until ``expected`` records arrived and nothing new came
    for the idle time (so late duplicates are still caught), or the timeout passes.

    A broker that stops answering is waited for (up to the outage seconds, then
    BrokerLost) and the read goes on where it was: a verdict read across a hole in the
    broker's availability would report ticks missing that are only out of reach. The
    timeout counts only time with a broker, since the pipeline cannot deliver without one.
    A topic deleted under the read ends it at once (TopicGone), and so does one deleted
    and created again (its topic id changed): the read would go on in the new log from the
    old one's position, and a verdict would join two logs neither of which it read whole.
    """
    timeout_s, idle_s, outage_s = waits
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        **kafka_auth(),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    n = 0
    with Outage(bootstrap, outage_s, f"reading {topic}", "--outage-deadline") as outage:
        try:
            await consumer.start()  # (inside: a start that fails has opened connections too)
            tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
            first_id = await topic_id(consumer, topic)  # None: the broker gives no ids
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            deadline = time.monotonic() + timeout_s
            last_new = time.monotonic()
            while True:
                batch = await consumer.getmany(timeout_ms=500, max_records=20_000)
                got = 0
                for recs in batch.values():
                    n += sum(1 for r in recs if on_record(r))
                    got += len(recs)
                if got:
                    last_new = time.monotonic()
                    continue
                asked_at = time.monotonic()
                now_id = None
                try:
                    async with asyncio.timeout(_PROBE_S):
                        at_end = await _at_end(consumer, tps)
                        if first_id is not None:
                            now_id = await topic_id(consumer, topic)
                except (KafkaError, TimeoutError) as e:
                    # The client cannot tell a deleted topic from an absent broker: both
                    # leave it retrying. The broker can, when it answers.
                    if await _gone(bootstrap, topic):
                        raise TopicGone(topic, setting) from None
                    await asyncio.sleep(outage.failed(e, asked_at))
                    continue
                if now_id is not None and now_id != first_id:
                    raise TopicGone(topic, setting, recreated=True)
                away = outage.answered()
                now = time.monotonic()
                if away:
                    deadline += away
                    last_new = now  # records held back by the outage may still come
                if timeout_s <= 0:
                    if at_end:
                        return n
                    continue
                if expected is not None and n >= expected and now - last_new >= idle_s:
                    return n
                if now >= deadline:
                    return n
        finally:
            await stop_consumer(consumer)


async def _at_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> bool:
    """Whether the consumer has read every partition up to its end (for read_committed:
    its last stable offset)."""
    ends = await consumer.end_offsets(tps)
    for tp in tps:
        if int(await consumer.position(tp)) < ends[tp]:
            return False
    return True


async def verify(
    bootstrap: str,
    topic: str,
    manifest: Manifest,
    deadletter_topic: str | None = None,
    timeout_s: float = 0.0,
    idle_s: float = 2.0,
    expected_deadletters: list[ExpectedDeadLetter] | None = None,
    connect_timeout_s: float = 10.0,
    outage_s: float = 300.0,
) -> VerifyResult:
    """Compare the tick topic (and the dead-letter topic) with ``manifest``.

    :param expected_deadletters: match the dead-letter topic's records to these by
        their bytes (expectations from a source file), not only count them
    :param connect_timeout_s: wait this long for a broker first (BrokerUnreachable);
        a topic that is not there raises TopicMissing before anything is read
    :param outage_s: wait this long for a broker that stops answering mid-read, then
        BrokerLost (``_read_topic`` says why a read is not cut short)
    """
    dl = [deadletter_topic] if deadletter_topic else []
    await reach_topics(bootstrap, [topic, *dl], connect_timeout_s)
    checks: dict[str, SymbolCheck] = {}
    expected_total = sum(s.ticks for s in manifest.symbols.values())
    res = VerifyResult(ticks_expected=expected_total)
    day = trading_day_ns(manifest)

    def on_tick(r: Any) -> bool:
        try:
            t = orjson.loads(r.value)
            sym, seq = str(t["symbol"]), int(t["seq"])
            # Only a day's judge needs the event time, to tell the day's ticks.
            when = int(t["event_ts"]) if day is not None else 0
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            res.unreadable += 1
            return False
        if not 0 < seq < _MAX_TICK_SEQ:  # the ledger keeps a byte per sequence number
            res.unreadable += 1
            return False
        if day is not None and not day[0] <= when < day[1]:
            res.ticks_other_days += 1
            return False
        c = checks.get(sym)
        if c is None:
            c = checks[sym] = SymbolCheck()
        c.add(t)
        return True

    waits = (timeout_s, idle_s, outage_s)
    res.ticks_read = await _read_topic(bootstrap, topic, on_tick, expected_total, waits)
    _compare(res, manifest, checks)
    if deadletter_topic is not None:
        await _count_deadletters(
            res, bootstrap, deadletter_topic, manifest, expected_deadletters, waits
        )
    return res


# Far above any symbol's ticks in a day: a sequence number past it is not a tick's.
_MAX_TICK_SEQ = 2**31


def trading_day_ns(manifest: Manifest) -> tuple[int, int] | None:
    """[start, end) in epoch ns of an ITCH manifest's trading day; None for a JSON feed
    (its ticks carry the source's own times, of no one day) or a manifest without a date.

    An ITCH tick's event time is its day's midnight plus the message's time of day, so
    the day's ticks are exactly those inside it.
    """
    text = manifest.params.get("date")
    if manifest.source not in ("synthetic", "itch") or not isinstance(text, str) or not text:
        return None
    d = date.fromisoformat(text)
    return midnight_ns(d.isoformat()), midnight_ns((d + timedelta(days=1)).isoformat())


def _compare(res: VerifyResult, manifest: Manifest, checks: dict[str, SymbolCheck]) -> None:
    """Each symbol's ticks read against the manifest's count and checksum, into ``res``."""
    for sym, exp in manifest.symbols.items():
        c = checks.get(sym)
        if c is None:
            c = SymbolCheck()
        seen = sum(c.seen[1 : exp.ticks + 1])
        missing = exp.ticks - seen
        mismatch = c.ledger.checksum != exp.checksum if exp.ticks else c.ledger.count != 0
        res.missing += missing
        res.duplicated += c.duplicated
        res.reordered += c.reordered
        res.checksum_mismatch += int(mismatch)
        if missing or c.duplicated or c.reordered or mismatch:
            res.per_symbol[sym] = {
                "expected": exp.ticks,
                "missing": missing,
                "duplicated": c.duplicated,
                "reordered": c.reordered,
                "checksum_ok": not mismatch,
            }
    res.unexpected_symbols = sum(1 for sym in checks if sym not in manifest.symbols)


async def _count_deadletters(
    res: VerifyResult,
    bootstrap: str,
    topic: str,
    manifest: Manifest,
    expected: list[ExpectedDeadLetter] | None,
    waits: tuple[float, float, float],
) -> None:
    """The dead-letter topic's records counted (and, with ``expected``, matched by their
    bytes) into ``res``; ``waits`` is (timeout, idle, outage) seconds."""
    count = 0
    values: Counter[bytes] = Counter()
    ours = _replay_deadletter(manifest)

    def on_dl(r: Any) -> bool:
        nonlocal count
        if not ours(r):
            return False
        count += 1
        if expected is not None:
            values[r.value] += 1
        return True

    timeout_s, idle_s, outage_s = waits
    await _read_topic(
        bootstrap,
        topic,
        on_dl,
        manifest.deadletters_expected,
        (min(timeout_s, 10.0), idle_s, outage_s),
        "--deadletter-topic",
    )
    res.deadletters = count
    res.deadletters_expected = manifest.deadletters_expected
    if expected is not None:
        for d in expected:
            d.delivered = min(d.copies, values[d.payload])
            values[d.payload] -= d.delivered
        res.deadletter_spans = expected


def _replay_deadletter(manifest: Manifest) -> Callable[[Any], bool]:
    """Whether a dead letter came from the manifest's replay. The dead-letter topic keeps
    every earlier day's too, so one is the replay's when it came from the replay's raw
    topic at or after the offsets where the replay began, and (an ITCH day) its date header
    is the replay's day. What a manifest does not know (where its replay began: one from
    a source file or from before the offsets were kept) does not rule a dead letter out,
    and neither does a header missing from it, so a stray record is counted, not hidden."""
    starts = manifest.start_offsets if manifest.topic else []
    topic = manifest.topic.encode()
    day = manifest.params.get("date") if trading_day_ns(manifest) else None
    day_header = day.encode() if isinstance(day, str) else None

    def ours(r: Any) -> bool:
        h = dict(r.headers or ())
        if day_header is not None and h.get(HDR_DATE, day_header) != day_header:
            return False
        if not starts:
            return True
        try:
            part, offset = int(h[HDR_DL_PARTITION]), int(h[HDR_DL_OFFSET])
        except (KeyError, TypeError, ValueError):
            return True
        if h.get(HDR_DL_TOPIC) != topic or not 0 <= part < len(starts):
            return False
        return offset >= starts[part]

    return ours


def run_verify(*args: Any, **kw: Any) -> VerifyResult:
    MISSING_TOPICS.install()  # a topic deleted under the read floods the log otherwise
    return asyncio.run(verify(*args, **kw))
