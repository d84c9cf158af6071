"""Replay sources: where raw venue messages come from, in feed order.

Every source yields ``RawMessage``: the venue bytes, the codec that decodes
them, a source timestamp used for pacing, and the instrument key that decides
the Kafka partition (``None`` = market-wide, copied to every partition).

The key is the instrument's symbol, for ITCH too (learnt from the stock
directory message that precedes a stock's other messages), which is also the
key of its ticks: ``md.raw`` and ``md.ticks`` are co-partitioned. With equal
partition counts a symbol's raw messages and its ticks have the same partition
number, so a handler's transaction for one input partition writes to one ticks
partition instead of to every one of them (fewer partitions in each
transaction, fewer commit markers for the broker to write).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from ingest.codecs import itch
from ingest.codecs.errors import DecodeError, SourceError
from ingest.codecs.jsonfeed import MAX_TS_NS, decode_json
from ingest.keys import symbol_key
from ingest.normalize import EXCHANGE_TZ, Normalizer, midnight_ns

NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class RawMessage:
    ts_ns: int  # ITCH: ns since local midnight; JSON: ns since epoch
    key: bytes | None  # None: market-wide, sent to every partition
    payload: bytes
    codec: str  # "itch" or "json"


def parse_hhmm(s: str) -> int:
    """``HH:MM`` or ``HH:MM:SS`` -> seconds since midnight; ValueError names the input."""
    parts = s.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
        raise ValueError(f"expected HH:MM, got {s!r}")
    h, m = int(parts[0]), int(parts[1])
    sec = int(parts[2]) if len(parts) == 3 else 0
    if not (0 <= h <= 23 and 0 <= m < 60 and 0 <= sec < 60) and (h, m, sec) != (24, 0, 0):
        raise ValueError(f"expected HH:MM, got {s!r}")
    return h * 3600 + m * 60 + sec


class ItchKeys:
    """Partition keys of ITCH messages, as the feed reveals its stock directory."""

    def __init__(self) -> None:
        self._by_locate: dict[int, bytes] = {}

    def key(self, payload: bytes) -> bytes | None:
        """None for a market-wide message (locate 0). A stock message whose
        directory message has not been seen keeps its 2-byte locate as the key;
        a real feed sends the directory first."""
        locate = int.from_bytes(payload[1:3], "big")
        if locate == 0:
            return None
        if payload[:1] == b"R" and len(payload) >= 19:
            self._by_locate[locate] = symbol_key(itch.stock_name(payload[11:19]))
        return self._by_locate.get(locate) or payload[1:3]


def check_readable(path: Path) -> None:
    """SourceError unless ``path`` is a regular file this process can read.

    Checked before anything is published, so a wrong ``--file`` costs nothing.
    """
    where = str(path)
    if not path.exists():
        raise SourceError(where, "no such file")
    if not path.is_file():
        raise SourceError(where, "not a regular file")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise SourceError(where, f"cannot read it ({e.strerror or e})") from None


def itch_file_source(path: str | Path) -> Iterator[RawMessage]:
    """Messages of a NASDAQ TotalView-ITCH 5.0 file (plain or gzip, 2-byte framing).

    Only the header fields needed for routing and pacing are read here; a span
    where the framing is lost is still sent, unkeyed (the handler dead-letters
    it), so the replay never silently drops input.
    """
    last_ts = 0
    keys = ItchKeys()
    with itch.open_itch_file(path) as f:
        for payload in itch.iter_frames(f):
            if itch.is_frame(payload):
                last_ts = int.from_bytes(payload[5:11], "big")
                key = keys.key(payload)
            else:
                key = b""
            yield RawMessage(last_ts, key, payload, "itch")


def file_faults(messages: Iterable[RawMessage], path: str | Path) -> Iterator[RawMessage]:
    """``messages`` of the file ``path``; a fault reading it raises SourceError naming it,
    once the messages before the fault have been yielded.

    The framing names a file cut short itself; a read error, a gzip stream cut
    short or corrupt, whichever layer finds it, is the user's file too.
    """
    where = str(path)
    try:
        yield from messages
    except SourceError:
        raise
    except DecodeError as e:
        raise SourceError(where, f"{e.reason}: {e.detail}" if e.detail else e.reason) from None
    except EOFError:
        raise SourceError(where, "the compressed stream ends early (file truncated)") from None
    except (OSError, zlib.error) as e:
        raise SourceError(where, f"cannot read it ({e})") from None


# A JSON-lines message is small; a line past this is not one (a binary file, a
# missing newline) and reading it whole could take the replay's memory. It is sent
# as one record, key (its symbol) and value, to a topic that takes 1 MiB a record
# batch (md.raw's max.message.bytes, core/topology.py): 1 KiB is left for the
# batch's framing and the record's headers, so every line accepted fits.
RECORD_FRAMING_BYTES = 1024
MAX_LINE_BYTES = (1 << 20) - RECORD_FRAMING_BYTES


def jsonl_source(path: str | Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RawMessage]:
    """Messages of a JSON-lines feed file (format in ``ingest.codecs.jsonfeed``).

    Lines are forwarded as they are; only ``symbol`` and ``ts`` are peeked at
    for routing and pacing. Validation is the handler's job, so an invalid line
    travels to the dead-letter topic instead of vanishing here. A line longer
    than ``max_line_bytes``, or whose symbol and bytes together are, is not a
    message: SourceError names its number (the lines before it have been yielded).
    """
    last_ts = 0
    where = str(path)
    with Path(path).open("rb") as f:
        n = 0
        while True:
            try:
                line = f.readline(max_line_bytes + 1)
            except OSError as e:
                raise SourceError(f"{where} line {n + 1}", f"cannot read it ({e})") from None
            if not line:
                return
            n += 1
            if len(line) > max_line_bytes and not (
                len(line) == max_line_bytes + 1 and line.endswith(b"\n")
            ):
                raise SourceError(
                    f"{where} line {n}",
                    f"longer than {max_line_bytes:,} bytes (the limit: --max-line-bytes)",
                )
            line = line.strip()
            if not line:
                continue
            key = b""
            try:
                obj = orjson.loads(line)
                if isinstance(obj, dict):
                    sym = obj.get("symbol")
                    if isinstance(sym, str) and sym:
                        key = sym.encode()
                    ts = obj.get("ts")
                    if isinstance(ts, int) and not isinstance(ts, bool):
                        # Out of range it is the handler's to dead-letter, and
                        # no time to pace by.
                        if 0 <= ts < MAX_TS_NS:
                            last_ts = ts
                    elif isinstance(ts, str):
                        try:
                            last_ts = decode_json(line).ts
                        except ValueError:
                            pass
            except orjson.JSONDecodeError:
                pass
            if len(line) + len(key) > max_line_bytes:
                raise SourceError(
                    f"{where} line {n}",
                    f"{len(line):,} bytes and a {len(key):,}-byte symbol make a record over "
                    f"{max_line_bytes:,} bytes (the limit: --max-line-bytes)",
                )
            yield RawMessage(last_ts, key, line, "json")


def parse_only(value: str | None) -> frozenset[str] | None:
    """``--only AAPL,MSFT`` -> the symbols (None: every symbol); ValueError on an empty list."""
    if value is None:
        return None
    syms = frozenset(s.strip() for s in value.split(",") if s.strip())
    if not syms:
        raise ValueError(f"expected comma-separated symbols, got {value!r}")
    return syms


def only_symbols(source: Iterable[RawMessage], symbols: frozenset[str]) -> Iterator[RawMessage]:
    """The messages of ``symbols`` and the market-wide ones, in order.

    ITCH messages carry a stock locate, not the symbol: a stock's locate is learned from
    its stock directory message, which the feed sends before any other message of that
    stock. JSON lines are routed by their symbol. A message that cannot be attributed
    (a frame too short for a locate, a line without a symbol) is kept: it is bad input the
    handler dead-letters, and a subset must not hide it.
    """
    locates: set[int] = set()
    for m in source:
        if m.codec != "itch":
            if not m.key or m.key.decode("utf-8", "replace") in symbols:
                yield m
            continue
        p = m.payload
        if m.key is None or not itch.is_frame(p):
            yield m
            continue
        locate = int.from_bytes(p[1:3], "big")
        if (
            p[:1] == b"R"
            and len(p) >= 19
            and p[11:19].decode("ascii", "replace").rstrip() in symbols
        ):
            locates.add(locate)
        if locate in locates:
            yield m


def subset_of(source: Iterable[RawMessage], symbols: frozenset[str] | None) -> Iterable[RawMessage]:
    return source if symbols is None else only_symbols(source, symbols)


class ItchWindow:
    """Restrict an ITCH stream to ``[start, end)`` seconds since midnight.

    A consumer joining mid-day needs the state the day built so far, as a real
    feed's snapshot service gives it: at the window start this emits the
    system events seen, the stock directory and trading actions, and one add
    order per live order (same reference, side, price, shares), then the
    messages inside the window. Ticks downstream are then those of a book that
    is correct from the first message.
    """

    def __init__(self, source: Iterable[RawMessage], start: int | None, end: int | None) -> None:
        self.source = source
        self.start_ns = None if start is None else start * NS
        self.end_ns = None if end is None else end * NS

    def __iter__(self) -> Iterator[RawMessage]:
        if self.start_ns is None:
            for m in self.source:
                if self.end_ns is not None and m.ts_ns >= self.end_ns:
                    return
                yield m
            return
        state = Normalizer()
        sys_events: list[bytes] = []
        reference: dict[int, list[bytes]] = {}  # locate -> R / H payloads, in order
        day = "2000-01-03"  # only book state is needed here, not tick times
        started = False
        for m in self.source:
            if not started and m.ts_ns < self.start_ns:
                p = m.payload
                if not p:
                    continue
                t = p[:1]
                if t in (b"S", b"V", b"W"):
                    sys_events.append(p)
                elif t in (b"R", b"H", b"Y", b"h") and len(p) >= 3:
                    reference.setdefault(int.from_bytes(p[1:3], "big"), []).append(p)
                try:
                    state.on_itch(p, day, 0, [])
                except itch.DecodeError:
                    pass
                continue
            if not started:
                started = True
                yield from self._snapshot(state, sys_events, reference)
            if self.end_ns is not None and m.ts_ns >= self.end_ns:
                return
            yield m
        if not started:
            yield from self._snapshot(state, sys_events, reference)

    def _snapshot(
        self, state: Normalizer, sys_events: list[bytes], reference: dict[int, list[bytes]]
    ) -> Iterator[RawMessage]:
        ts = self.start_ns
        assert ts is not None
        for p in sys_events:
            yield RawMessage(ts, None, _retime(p, ts), "itch")
        keys = ItchKeys()
        for payloads in reference.values():
            for p in payloads:
                yield RawMessage(ts, keys.key(p), _retime(p, ts), "itch")
        for ref, (locate, is_bid, price, shares) in state.books.orders.items():
            stock = state.directory.get(locate, "")
            add = itch.encode(
                itch.AddOrder(locate, 0, ts, ref, "B" if is_bid else "S", shares, stock, price)
            )
            yield RawMessage(ts, keys.key(add), add, "itch")


def _retime(payload: bytes, ts: int) -> bytes:
    return payload[:5] + ts.to_bytes(6, "big") + payload[11:]


class JsonWindow:
    """Restrict a JSON stream to a time-of-day window in the exchange time zone."""

    def __init__(
        self, source: Iterable[RawMessage], start: int | None, end: int | None, day: str | None
    ) -> None:
        self.source = source
        self.start = start
        self.end = end
        self.day = day

    def __iter__(self) -> Iterator[RawMessage]:
        base: int | None = None if self.day is None else midnight_ns(self.day)
        for m in self.source:
            if base is None:
                d = datetime.fromtimestamp(m.ts_ns / NS, tz=UTC).astimezone(EXCHANGE_TZ)
                base = midnight_ns(d.date().isoformat())
            tod = m.ts_ns - base
            if self.start is not None and tod < self.start * NS:
                continue
            if self.end is not None and tod >= self.end * NS:
                return
            yield m
