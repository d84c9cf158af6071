"""ITCH framing: every frame is checked against its type's length, garbage comes out
as raw desynchronised records, the framing resynchronises on the next valid frames,
and a file cut short is the user's error (SourceError), not a record."""

from __future__ import annotations

import gzip
import io
import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.codecs import itch
from ingest.codecs.errors import DecodeError, SourceError
from ingest.replay.source import itch_file_source
from ingest.replay.synthetic import SyntheticDay

TYPES = sorted(itch.MESSAGE_LENGTHS)
CHUNKS = [1, 2, 3, 7, 64, 1 << 20]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """A frame's payload: a type byte and a body of that type's length (content free:
    the framing does not look inside)."""
    t = draw(st.sampled_from(TYPES))
    n = itch.MESSAGE_LENGTHS[t] - 1
    return t + draw(st.binary(min_size=n, max_size=n))


def has_header(data: bytes) -> bool:
    """Does any position of ``data`` read as a valid frame header (length, type)?"""
    return any(
        data[i] == 0 and itch.MESSAGE_LENGTHS.get(data[i + 2 : i + 3]) == data[i + 1]
        for i in range(len(data) - 2)
    )


garbage = st.binary(min_size=1, max_size=120).filter(lambda g: not has_header(g))


def records(data: bytes, chunk: int) -> list[tuple[int, bytes]]:
    return list(itch.iter_records(io.BytesIO(data), chunk_size=chunk, name="f.itch"))


def reserialise(recs: list[tuple[int, bytes]]) -> bytes:
    """The input again: frames re-framed, desynchronised spans as they were."""
    return b"".join(itch.frame(p) if itch.is_frame(p) else p for _, p in recs)


def check_offsets(recs: list[tuple[int, bytes]]) -> None:
    at = 0
    for off, p in recs:
        assert off == at
        at += len(itch.frame(p)) if itch.is_frame(p) else len(p)


def check_desync_records(recs: list[tuple[int, bytes]]) -> None:
    for _, p in recs:
        if not itch.is_frame(p):
            assert 0 < len(p) <= itch.MAX_DESYNC_BYTES
            with pytest.raises(DecodeError):
                itch.decode(p)


@SETTINGS
@given(
    msgs=st.lists(payloads(), min_size=0, max_size=30),
    junk=garbage,
    where=st.integers(min_value=0),
    chunk=st.sampled_from(CHUNKS),
)
def test_garbage_anywhere_is_one_span_and_every_frame_around_it_survives(
    msgs: list[bytes], junk: bytes, where: int, chunk: int
) -> None:
    frames = [itch.frame(p) for p in msgs]
    starts = [0, *itertools.accumulate(len(f) for f in frames)]
    clean = b"".join(frames)
    p = where % (len(clean) + 1)
    data = clean[:p] + junk + clean[p:]
    before = [m for m, e in zip(msgs, starts[1:], strict=True) if e <= p]
    after = [m for m, s in zip(msgs, starts, strict=False) if s >= p]
    damaged = len(msgs) - len(before) - len(after)
    assert damaged in (0, 1)
    recs: list[tuple[int, bytes]] = []
    try:
        for r in itch.iter_records(io.BytesIO(data), chunk_size=chunk, name="f.itch"):
            recs.append(r)
    except SourceError as e:
        # Damage at the very end can look like a cut-short file (one or two bytes
        # that could begin a frame): that is reported, with everything before it.
        assert not after, e
        assert e.where.startswith("f.itch @ byte ")
        assert int(e.where.rsplit(" ", 1)[1]) >= starts[len(before)]
        assert [pl for _, pl in recs][: len(before)] == before
        return
    assert reserialise(recs) == data
    check_offsets(recs)
    check_desync_records(recs)
    got = [pl for _, pl in recs]
    assert got[: len(before)] == before
    assert got[len(got) - len(after) :] == after
    middle = got[len(before) : len(got) - len(after)]
    # The inserted bytes and at most the one frame they landed in; some of it is
    # always a desynchronised record, never silently a message.
    hit = frames[len(before)] if damaged else b""
    cut = p - starts[len(before)] if damaged else 0
    assert b"".join(itch.frame(x) if itch.is_frame(x) else x for x in middle) == (
        hit[:cut] + junk + hit[cut:]
    )
    assert any(not itch.is_frame(x) for x in middle)
    if not damaged:
        assert b"".join(middle) == junk


@SETTINGS
@given(
    msgs=st.lists(payloads(), min_size=1, max_size=30),
    junks=st.lists(garbage, min_size=1, max_size=5),
    picks=st.lists(st.integers(min_value=0), min_size=5, max_size=5),
    chunk=st.sampled_from(CHUNKS),
)
def test_several_spans_between_frames_come_out_exactly(
    msgs: list[bytes], junks: list[bytes], picks: list[int], chunk: int
) -> None:
    """Garbage between frames (not at the very end), spans at least RESYNC_FRAMES
    frames apart: each span is exactly the inserted bytes, and every message comes
    out in order."""
    slots: list[int] = []
    for k in sorted({k % len(msgs) for k in picks[: len(junks)]}):
        if not slots or k - slots[-1] >= itch.RESYNC_FRAMES:
            slots.append(k)
    where = dict(zip(slots, junks, strict=False))
    parts: list[bytes] = []
    expect: list[bytes] = []
    for i, m in enumerate(msgs):
        if i in where:
            parts.append(where[i])
            expect.append(where[i])
        parts.append(itch.frame(m))
        expect.append(m)
    data = b"".join(parts)
    recs = records(data, chunk)
    check_offsets(recs)
    check_desync_records(recs)
    got = [p for _, p in recs]
    # A span may come out in pieces (never decodable ones); glue them back.
    glued: list[bytes] = []
    for p in got:
        if not itch.is_frame(p) and glued and not itch.is_frame(glued[-1]):
            glued[-1] += p
        else:
            glued.append(p)
    assert glued == expect


@SETTINGS
@given(
    msgs=st.lists(payloads(), min_size=1, max_size=20),
    cut=st.integers(min_value=1),
    chunk=st.sampled_from(CHUNKS),
    gz=st.booleans(),
)
def test_a_truncated_tail_names_the_file_and_the_offset_of_the_cut_frame(
    tmp_path_factory: pytest.TempPathFactory, msgs: list[bytes], cut: int, chunk: int, gz: bool
) -> None:
    frames = [itch.frame(p) for p in msgs]
    data = b"".join(frames)
    last = len(data) - len(frames[-1])
    keep = 1 + cut % (len(frames[-1]) - 1)  # 1 .. len-1 bytes of the last frame
    path = tmp_path_factory.mktemp("cut") / ("day.itch.gz" if gz else "day.itch")
    body = data[: last + keep]
    path.write_bytes(gzip.compress(body) if gz else body)
    got: list[bytes] = []
    with itch.open_itch_file(path) as f:
        with pytest.raises(SourceError) as e:
            for p in itch.iter_frames(f, chunk_size=chunk):
                got.append(p)
    assert got == msgs[:-1]
    assert e.value.where == f"{path} @ byte {last}" + (" (decompressed)" if gz else "")
    assert "ends inside the last frame" in e.value.what


@SETTINGS
@given(
    msgs=st.lists(payloads(), min_size=1, max_size=200),
    cut=st.integers(min_value=0),
    chunk=st.sampled_from([7, 1 << 20]),
)
def test_a_cut_short_gzip_file_is_a_source_error(
    tmp_path_factory: pytest.TempPathFactory, msgs: list[bytes], cut: int, chunk: int
) -> None:
    z = gzip.compress(b"".join(itch.frame(p) for p in msgs))
    keep = 2 + cut % (len(z) - 2)  # the magic stays: it is still a gzip file
    path = tmp_path_factory.mktemp("gz") / "day.itch.gz"
    path.write_bytes(z[:keep])
    got: list[bytes] = []
    with itch.open_itch_file(path) as f:
        with pytest.raises(SourceError) as e:
            for p in itch.iter_frames(f, chunk_size=chunk):
                got.append(p)
    assert e.value.where.startswith(f"{path} @ byte ")
    assert "gzip" in e.value.what
    assert got == msgs[: len(got)]


@SETTINGS
@given(data=st.binary(max_size=400), chunk=st.sampled_from(CHUNKS))
def test_any_bytes_are_accounted_for_and_no_desync_record_decodes(data: bytes, chunk: int) -> None:
    try:
        recs = records(data, chunk)
    except SourceError as e:
        # Only a plausible frame start cut short at the end.
        assert e.where.startswith("f.itch @ byte ")
        return
    assert reserialise(recs) == data
    check_offsets(recs)
    check_desync_records(recs)


def test_a_span_that_reads_as_a_message_is_split_so_it_cannot_decode() -> None:
    """12 bytes of garbage starting with 'S' would decode as a system event."""
    event = itch.encode(itch.SystemEvent(0, 0, 1, "O"))
    ok = itch.frame(event)
    junk = b"S" + bytes(11)
    assert not has_header(junk)
    recs = records(ok + junk + ok * 3, 1 << 20)
    assert [p for _, p in recs] == [event, b"S", bytes(11), event, event, event]
    check_desync_records(recs)


def test_a_long_span_comes_out_in_pieces_that_fit_a_record() -> None:
    junk = bytes([0xFF]) * (itch.MAX_DESYNC_BYTES * 2 + 5)
    ok = itch.frame(itch.encode(itch.SystemEvent(0, 0, 1, "O")))
    recs = records(ok + junk + ok, 4096)
    assert [len(p) for _, p in recs] == [12, itch.MAX_DESYNC_BYTES, itch.MAX_DESYNC_BYTES, 5, 12]
    assert reserialise(recs) == ok + junk + ok


def test_resync_needs_consecutive_frames_or_the_end_of_the_file() -> None:
    """One valid-looking header inside garbage is not enough to trust the position."""
    event = itch.encode(itch.SystemEvent(0, 0, 1, "O"))
    fake = itch.frame(event)  # a lone valid frame in the junk...
    junk = b"\xff" + fake + b"\xff\xff"  # ...followed by more junk
    ok = itch.frame(event)
    recs = records(ok + junk + ok * 4, 1 << 20)
    assert [p for _, p in recs] == [event, junk, event, event, event, event]


def test_spans_closer_than_the_resync_run_come_out_as_one() -> None:
    """Fewer valid frames than RESYNC_FRAMES between two bad spans cannot be trusted:
    they go out with the spans, as one dead-lettered record, not as messages."""
    event = itch.encode(itch.SystemEvent(0, 0, 1, "O"))
    ok = itch.frame(event)
    recs = records(ok + b"\xff" + ok * 2 + b"\xff" + ok * 3, 1 << 20)
    assert [p for _, p in recs] == [event, b"\xff" + ok * 2 + b"\xff", event, event, event]


def test_37_garbage_bytes_in_a_synthetic_day_lose_no_message(tmp_path: Path) -> None:
    """The reported case: 37 bytes in the middle of a file cost one record, not hundreds
    of messages; the replay source sends the span unkeyed so it is dead-lettered once."""
    msgs = [m.payload for m in itertools.islice(SyntheticDay(6, 3), 20_000)]
    frames = [itch.frame(p) for p in msgs]
    junk = bytes(range(200, 237))
    assert not has_header(junk)
    half = len(frames) // 2
    path = tmp_path / "day.itch.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"".join(frames[:half]) + junk + b"".join(frames[half:]))
    with itch.open_itch_file(path) as f:
        recs = list(itch.iter_records(f))
    offset = sum(len(x) for x in frames[:half])
    assert [p for _, p in recs] == [*msgs[:half], junk, *msgs[half:]]
    assert recs[half] == (offset, junk)
    sent = list(itch_file_source(path))
    assert [m.payload for m in sent] == [*msgs[:half], junk, *msgs[half:]]
    assert sent[half].key == b""
    # Pacing ignores the junk's "timestamp".
    assert sent[half].ts_ns == sent[half - 1].ts_ns
