"""NASDAQ TotalView-ITCH 5.0 message codec.

Every message starts with type (1 byte), stock locate (2), tracking number (2)
and a 6-byte timestamp (nanoseconds since midnight); all integers are
big-endian. Prices are 4-byte integers with 4 implied decimals (``*_e4``
fields) except the MWCB levels, which are 8-byte with 8 implied decimals
(``*_e8``). Alpha fields are space padded on the wire and stripped here.

Decoding is table driven: one precompiled ``struct.Struct`` per message type,
with the 6-byte timestamp read as a 16-bit and a 32-bit half so that a whole
message unpacks in one call.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

from ingest.codecs.errors import DecodeError, SourceError

__all__ = ["DecodeError", "SourceError"]  # re-exported: callers catch itch.DecodeError

HEADER_LEN = 11


class SystemEvent(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    event_code: str


class StockDirectory(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    stock: str
    market_category: str
    financial_status: str
    round_lot_size: int
    round_lots_only: str
    issue_classification: str
    issue_subtype: str
    authenticity: str
    short_sale_threshold: str
    ipo_flag: str
    luld_tier: str
    etp_flag: str
    etp_leverage_factor: int
    inverse_indicator: str


class StockTradingAction(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    stock: str
    trading_state: str
    reserved: str
    reason: str


class RegShoRestriction(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    stock: str
    action: str


class MarketParticipantPosition(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    mpid: str
    stock: str
    primary_market_maker: str
    market_maker_mode: str
    participant_state: str


class MwcbDeclineLevel(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    level1_e8: int
    level2_e8: int
    level3_e8: int


class MwcbStatus(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    breached_level: str


class IpoQuotingPeriodUpdate(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    stock: str
    release_time: int
    release_qualifier: str
    ipo_price_e4: int


class LuldAuctionCollar(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    stock: str
    reference_price_e4: int
    upper_price_e4: int
    lower_price_e4: int
    extension: int


class OperationalHalt(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    stock: str
    market_code: str
    halt_action: str


class AddOrder(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    order_ref: int
    side: str
    shares: int
    stock: str
    price_e4: int


class AddOrderMpid(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    order_ref: int
    side: str
    shares: int
    stock: str
    price_e4: int
    attribution: str


class OrderExecuted(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    order_ref: int
    executed_shares: int
    match_number: int


class OrderExecutedWithPrice(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    order_ref: int
    executed_shares: int
    match_number: int
    printable: str
    price_e4: int


class OrderCancel(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    order_ref: int
    cancelled_shares: int


class OrderDelete(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    order_ref: int


class OrderReplace(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    original_ref: int
    new_ref: int
    shares: int
    price_e4: int


class Trade(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    order_ref: int
    side: str
    shares: int
    stock: str
    price_e4: int
    match_number: int


class CrossTrade(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    shares: int
    stock: str
    cross_price_e4: int
    match_number: int
    cross_type: str


class BrokenTrade(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    match_number: int


class Noii(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    paired_shares: int
    imbalance_shares: int
    imbalance_direction: str
    stock: str
    far_price_e4: int
    near_price_e4: int
    reference_price_e4: int
    cross_type: str
    price_variation: str


class RetailInterest(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    stock: str
    interest_flag: str


class DlcrPriceDiscovery(NamedTuple):
    locate: int
    tracking: int
    timestamp: int
    stock: str
    open_eligibility: str
    min_price_e4: int
    max_price_e4: int
    near_price_e4: int
    near_time: int
    lower_collar_e4: int
    upper_collar_e4: int


ItchMessage = (
    SystemEvent
    | StockDirectory
    | StockTradingAction
    | RegShoRestriction
    | MarketParticipantPosition
    | MwcbDeclineLevel
    | MwcbStatus
    | IpoQuotingPeriodUpdate
    | LuldAuctionCollar
    | OperationalHalt
    | AddOrder
    | AddOrderMpid
    | OrderExecuted
    | OrderExecutedWithPrice
    | OrderCancel
    | OrderDelete
    | OrderReplace
    | Trade
    | CrossTrade
    | BrokenTrade
    | Noii
    | RetailInterest
    | DlcrPriceDiscovery
)

# Body layout per type, after the common header. Codes: "c" one ASCII char,
# "aN" space-padded alpha of N bytes, "H"/"I"/"Q" unsigned 2/4/8-byte ints.
_LAYOUTS: dict[bytes, tuple[type[Any], tuple[str, ...]]] = {
    b"S": (SystemEvent, ("c",)),
    b"R": (
        StockDirectory,
        ("a8", "c", "c", "I", "c", "c", "a2", "c", "c", "c", "c", "c", "I", "c"),
    ),
    b"H": (StockTradingAction, ("a8", "c", "c", "a4")),
    b"Y": (RegShoRestriction, ("a8", "c")),
    b"L": (MarketParticipantPosition, ("a4", "a8", "c", "c", "c")),
    b"V": (MwcbDeclineLevel, ("Q", "Q", "Q")),
    b"W": (MwcbStatus, ("c",)),
    b"K": (IpoQuotingPeriodUpdate, ("a8", "I", "c", "I")),
    b"J": (LuldAuctionCollar, ("a8", "I", "I", "I", "I")),
    b"h": (OperationalHalt, ("a8", "c", "c")),
    b"A": (AddOrder, ("Q", "c", "I", "a8", "I")),
    b"F": (AddOrderMpid, ("Q", "c", "I", "a8", "I", "a4")),
    b"E": (OrderExecuted, ("Q", "I", "Q")),
    b"C": (OrderExecutedWithPrice, ("Q", "I", "Q", "c", "I")),
    b"X": (OrderCancel, ("Q", "I")),
    b"D": (OrderDelete, ("Q",)),
    b"U": (OrderReplace, ("Q", "Q", "I", "I")),
    b"P": (Trade, ("Q", "c", "I", "a8", "I", "Q")),
    b"Q": (CrossTrade, ("Q", "a8", "I", "Q", "c")),
    b"B": (BrokenTrade, ("Q",)),
    b"I": (Noii, ("Q", "Q", "c", "a8", "I", "I", "I", "c", "c")),
    b"N": (RetailInterest, ("a8", "c")),
    b"O": (DlcrPriceDiscovery, ("a8", "c", "I", "I", "I", "Q", "I", "I")),
}

# Wire length of every message type, as listed in the specification.
MESSAGE_LENGTHS: dict[bytes, int] = {}

_TYPE_OF: dict[type[Any], bytes] = {}


def _struct_code(code: str) -> str:
    if code == "c":
        return "c"
    if code.startswith("a"):
        return f"{code[1:]}s"
    return code


def _dec_char(b: bytes) -> str:
    return b.decode("latin-1")


def _dec_alpha(b: bytes) -> str:
    return b.decode("latin-1").rstrip(" ")


def stock_name(field: bytes) -> str:
    """An 8-byte ITCH stock field, as the decoder reads it."""
    return _dec_alpha(field)


def _ident(v: int) -> int:
    return v


_Decoder = tuple[struct.Struct, type[Any], tuple[Callable[[Any], Any], ...], bool]
_DECODERS: dict[int, _Decoder] = {}
_ENCODERS: dict[type[Any], tuple[struct.Struct, bytes, tuple[str, ...]]] = {}

for _t, (_cls, _codes) in _LAYOUTS.items():
    _fmt = ">cHHHI" + "".join(_struct_code(c) for c in _codes)
    _st = struct.Struct(_fmt)
    _convs = tuple(
        _dec_char if c == "c" else _dec_alpha if c.startswith("a") else _ident for c in _codes
    )
    _all_int = all(c in ("H", "I", "Q") for c in _codes)
    _DECODERS[_t[0]] = (_st, _cls, _convs, _all_int)
    _ENCODERS[_cls] = (_st, _t, _codes)
    MESSAGE_LENGTHS[_t] = _st.size
    _TYPE_OF[_cls] = _t


def message_type(msg: ItchMessage) -> bytes:
    """The one-byte ITCH type code of a decoded message."""
    return _TYPE_OF[type(msg)]


def decode(buf: bytes) -> ItchMessage:
    """Decode one ITCH 5.0 message (without its length prefix).

    Raises DecodeError for empty, unknown, truncated or over-long input, and for
    field values the specification does not allow where the handler relies on
    them (order side).
    """
    if not buf:
        raise DecodeError("empty")
    entry = _DECODERS.get(buf[0])
    if entry is None:
        raise DecodeError("unknown_type", f"type byte 0x{buf[0]:02x}")
    st, cls, convs, all_int = entry
    if len(buf) != st.size:
        reason = "truncated" if len(buf) < st.size else "length_mismatch"
        raise DecodeError(reason, f"type {chr(buf[0])!r} is {st.size} bytes, got {len(buf)}")
    vals = st.unpack(buf)
    ts = (vals[3] << 32) | vals[4]
    if all_int:
        msg = cls(vals[1], vals[2], ts, *vals[5:])
    else:
        body = [conv(v) for conv, v in zip(convs, vals[5:], strict=True)]
        msg = cls(vals[1], vals[2], ts, *body)
    if cls is AddOrder or cls is AddOrderMpid or cls is Trade:
        if msg.side not in ("B", "S"):
            raise DecodeError("bad_side", f"side {msg.side!r}")
    if ts >= 86_400 * 1_000_000_000:
        raise DecodeError("bad_timestamp", f"{ts} ns is past midnight")
    return msg


def encode(msg: ItchMessage) -> bytes:
    """Encode a message to its ITCH 5.0 wire bytes (without length prefix)."""
    st, t, codes = _ENCODERS[type(msg)]
    body: list[Any] = []
    v: Any
    for code, v in zip(codes, msg[3:], strict=True):
        if code == "c":
            body.append(v.encode("latin-1"))
        elif code.startswith("a"):
            body.append(v.encode("latin-1").ljust(int(code[1:]), b" "))
        else:
            body.append(v)
    ts = msg.timestamp
    return st.pack(t, msg.locate, msg.tracking, ts >> 32, ts & 0xFFFFFFFF, *body)


def frame(payload: bytes) -> bytes:
    """Prefix a message with the 2-byte big-endian length used by the sample files."""
    return struct.pack(">H", len(payload)) + payload


# Payload length of each type's message, indexed by the type byte; -1: not a type.
# A list, not a dict: the framing looks every message up in it.
_FRAME_LEN: list[int] = [-1] * 256
for _t, _n in MESSAGE_LENGTHS.items():
    _FRAME_LEN[_t[0]] = _n
# Every message is shorter than 256 bytes, so a frame's length prefix starts with 0.
assert max(MESSAGE_LENGTHS.values()) < 256
_PREFIX_LENS = frozenset(MESSAGE_LENGTHS.values())

# Frames in a row that must check out before the framing trusts a position again
# after losing sync (fewer if the file ends first). Random bytes pass one check
# about once in 200,000 positions; three in a row, practically never.
RESYNC_FRAMES = 3
# A desynchronised span longer than this comes out as several records, so each
# fits in one Kafka record.
MAX_DESYNC_BYTES = 1 << 16


def is_frame(payload: bytes) -> bool:
    """True if ``payload`` has the length its type byte calls for.

    False for the raw bytes of a desynchronised span, which ``iter_records``
    guarantees; ``decode`` refuses those (unknown type or wrong length).
    """
    return bool(payload) and _FRAME_LEN[payload[0]] == len(payload)


def open_itch_file(path: str | Path) -> IO[bytes]:
    """Open a plain or gzip-compressed ITCH file (detected by magic bytes)."""
    p = Path(path)
    with p.open("rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return cast(IO[bytes], gzip.open(p, "rb"))
    return p.open("rb")


def iter_frames(
    stream: IO[bytes], chunk_size: int = 1 << 20, name: str | None = None
) -> Iterator[bytes]:
    """Yield message payloads from a 2-byte length-framed ITCH stream.

    Every frame is checked against its type's length in the specification; a
    span where the framing is lost comes out as one record of its raw bytes
    (see ``iter_records``). A file cut short raises ``SourceError``.

    :param name: how errors name the input (default: the stream's file name)
    """
    return cast(Iterator[bytes], _scan(stream, chunk_size, name, False))


def iter_records(
    stream: IO[bytes], chunk_size: int = 1 << 20, name: str | None = None
) -> Iterator[tuple[int, bytes]]:
    """``iter_frames`` with the byte offset of each record in the (decompressed) stream.

    The offset is that of a frame's length prefix, or of the first byte of a
    desynchronised span. A span is a record of raw bytes (prefixes included)
    from the first position whose frame does not check out (unknown type byte,
    or a length other than its type's) to the first position where
    ``RESYNC_FRAMES`` valid frames follow one another, or the end of the file.
    ``is_frame`` is False for it.
    """
    return cast(Iterator[tuple[int, bytes]], _scan(stream, chunk_size, name, True))


def _chain(buf: bytes, q: int, n: int, eof: bool) -> int:
    """Do ``RESYNC_FRAMES`` valid frames start at ``q``? 1 yes, 0 no, -1 need more data.

    At the end of the file fewer will do, if at least one whole frame is there:
    a last frame cut short is then reported as a truncated file, not garbage.
    """
    lens = _FRAME_LEN
    p = q
    for k in range(RESYNC_FRAMES):
        if p + 3 > n:
            if not eof:
                return -1
            return int(k > 0 and (p == n or _plausible_prefix(buf, p, n)))
        length = (buf[p] << 8) | buf[p + 1]
        if lens[buf[p + 2]] != length:
            return 0
        p += 2 + length
        if p > n:
            return -1 if not eof else int(k > 0)
    return 1


def _plausible_prefix(buf: bytes, p: int, n: int) -> bool:
    """Could the 1 or 2 bytes at ``buf[p:n]`` begin a valid frame?"""
    return buf[p] == 0 and (n - p < 2 or buf[p + 1] in _PREFIX_LENS)


def _pieces(span: bytes) -> Iterator[tuple[int, bytes]]:
    """A desynchronised span as records (offset in the span, bytes), none decodable."""
    i = 0
    while i < len(span):
        piece = span[i : i + MAX_DESYNC_BYTES]
        if _FRAME_LEN[piece[0]] == len(piece):
            # The span happens to read as one whole message: a record of it would
            # decode. Its first byte alone cannot (no message is 1 byte long).
            piece = piece[:1]
        yield i, piece
        i += len(piece)


def _spans(
    buf: bytes, start: int, end: int, base: int, offsets: bool
) -> Iterator[bytes | tuple[int, bytes]]:
    """``buf[start:end]``, a desynchronised span, as undecodable records."""
    for off, piece in _pieces(buf[start:end]):
        yield (base + start + off, piece) if offsets else piece


def _resync(buf: bytes, scan: int, n: int, eof: bool) -> tuple[int, bool]:
    """Where frames start again at or after ``scan``: (offset, True) at a chain of whole
    frames; (offset to look on from, False) when more bytes are needed to tell."""
    q = scan
    while True:
        q = buf.find(b"\x00", q)
        if q < 0:
            return n, eof
        st = _chain(buf, q, n, eof)
        if st > 0:
            return q, True
        if st < 0:
            return q, False
        q += 1


def _read(stream: IO[bytes], chunk_size: int, where: str) -> bytes:
    try:
        return stream.read(chunk_size)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise SourceError(
            where,
            f"the gzip data is cut short or corrupt ({e}); fetch or compress the file again",
        ) from None


def _scan(
    stream: IO[bytes], chunk_size: int, name: str | None, offsets: bool
) -> Iterator[bytes | tuple[int, bytes]]:
    where = name if name is not None else str(getattr(stream, "name", "<stream>"))
    unit = " (decompressed)" if isinstance(stream, gzip.GzipFile) else ""
    lens = _FRAME_LEN
    buf = b""
    base = 0  # stream offset of buf[0]
    pos = 0  # next frame in buf
    desync = -1  # start of the span being resynchronised, or -1
    scan = 0  # next resync candidate
    eof = False
    while True:
        n = len(buf)
        if desync < 0:
            # The common path: one table lookup per frame. Every message is shorter
            # than 256 bytes, so a good prefix is 0 and then the type's length.
            while pos + 3 <= n:
                length = lens[buf[pos + 2]]
                if buf[pos + 1] != length or buf[pos]:
                    desync = pos
                    scan = pos + 1
                    break
                end = pos + 2 + length
                if end > n:
                    break
                yield (base + pos, buf[pos + 2 : end]) if offsets else buf[pos + 2 : end]
                pos = end
        if desync >= 0:
            q, found = _resync(buf, scan, n, eof)
            if not found:
                while q - desync > MAX_DESYNC_BYTES:
                    yield from _spans(buf, desync, desync + MAX_DESYNC_BYTES, base, offsets)
                    desync += MAX_DESYNC_BYTES
                scan = q
            else:
                yield from _spans(buf, desync, q, base, offsets)
                pos = q
                desync = -1
                continue
        if eof:
            if pos < n:
                if n - pos < 3 and not _plausible_prefix(buf, pos, n):
                    desync = pos  # a byte or two that cannot begin a frame: garbage
                    scan = pos + 1
                    continue
                _truncated(f"{where} @ byte {base + pos}{unit}", buf, pos, n)
            return
        keep = desync if desync >= 0 else pos
        chunk = _read(stream, chunk_size, f"{where} @ byte {base + n}{unit}")
        if not chunk:
            eof = True
            continue
        buf = buf[keep:] + chunk
        base += keep
        pos -= keep
        scan -= keep
        if desync >= 0:
            desync = 0


def _truncated(where: str, buf: bytes, pos: int, n: int) -> None:
    have = n - pos
    if have >= 2:
        need = 2 + ((buf[pos] << 8) | buf[pos + 1])
        what = f"the file ends inside the last frame ({have} of its {need} bytes)"
    else:
        what = "the file ends inside the last frame (1 byte of its length prefix)"
    raise SourceError(where, what + "; is it a partial download?")
