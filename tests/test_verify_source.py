"""``tickscale verify --source``: the expectations come from the replayed file itself,
so a stream the replay got wrong cannot vouch for itself, and each dead letter is named
by its place in the file."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from ingest.codecs import itch
from ingest.manifest import Manifest
from ingest.replay.source import NS, ItchWindow, itch_file_source, parse_hhmm
from ingest.replay.synthetic import SyntheticDay
from ingest.verify import expect_from_source
from tests.pipeline_utils import HandlerProc, json_trades, run_replay, summary
from tickscale.localstack.topics import TopicSet

DAY = "2024-11-25"
ZERO = {"missing": 0, "duplicated": 0, "reordered": 0, "checksum_mismatch": 0}
JUNK = bytes(range(200, 237))  # 37 bytes; none of them can start a frame


def itch_day(
    tmp_path: Path, name: str, gz: bool = True, tail: bytes = b""
) -> tuple[Path, Path, int]:
    """A small synthetic day as an ITCH file, and a copy with 37 bytes of junk between
    two frames in the middle (and ``tail`` at the end); returns both paths and the
    junk's offset."""
    end_ns = parse_hhmm("09:32") * NS
    frames = []
    for m in SyntheticDay(3, 7):
        if m.ts_ns >= end_ns:
            break
        frames.append(itch.frame(m.payload))
    assert len(frames) > 5_000
    half = len(frames) // 2
    offset = sum(len(f) for f in frames[:half])
    ext = ".itch.gz" if gz else ".itch"
    clean = tmp_path / f"{name}-clean{ext}"
    dirty = tmp_path / f"{name}{ext}"
    pack = gzip.compress if gz else bytes
    clean.write_bytes(pack(b"".join(frames)))
    dirty.write_bytes(pack(b"".join(frames[:half]) + JUNK + b"".join(frames[half:]) + tail))
    return clean, dirty, offset


def verify_source(ts: TopicSet, path: Path, *args: str, timeout_s: float = 90) -> tuple[int, str]:
    r = subprocess.run(
        [
            sys.executable, "-m", "tickscale", "verify", "--bootstrap", ts.bootstrap,
            "--topic", ts.ticks, "--raw-topic", ts.raw, "--deadletter-topic", ts.deadletter,
            "--source", str(path), "--date", DAY, "--timeout", str(timeout_s), *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s + 300,
    )  # fmt: skip
    return r.returncode, r.stdout + r.stderr


def _expect(path: Path) -> Manifest:
    src = ItchWindow(itch_file_source(path), None, None)
    return expect_from_source(src, "itch", DAY, "itch").manifest


@pytest.mark.slow
async def test_garbage_mid_file_costs_one_dead_letter_and_no_tick(
    topics: TopicSet, tmp_path: Path
) -> None:
    clean, dirty, offset = itch_day(tmp_path, "day")
    # Every real message of the file is still expected: the same ticks as without the junk.
    want = _expect(clean)
    got = _expect(dirty)
    assert got.symbols == want.symbols and sum(s.ticks for s in want.symbols.values()) > 1000
    assert got.deadletters_expected == 1 and got.deadletter_reasons == {"unknown_type": 1}

    manifest = tmp_path / "m.json"
    run_replay(
        topics, manifest, "--source", "itch", "--file", str(dirty), "--date", DAY, "--speed", "max"
    )
    m = Manifest.read(manifest)
    assert m.symbols == want.symbols and m.deadletters_expected == 1
    h = HandlerProc(topics, tmp_path, "a")
    try:
        rc, out = verify_source(topics, dirty)
        assert summary(out) == ZERO, out[-3000:]
        span = f"dead letter {dirty.name} @ byte {offset} (decompressed): 37 bytes, unknown_type"
        assert f"{span}, delivered 1 of 1" in out, out[-3000:]
        assert "deadletters=1 expected=1" in out, out[-3000:]
        assert rc == 0, out[-3000:]
        assert h.metric("tickscale_handler_deadletters_total") == 1
    finally:
        h.close()


@pytest.mark.slow
def test_verify_source_names_the_span_nobody_dead_lettered(
    topics: TopicSet, tmp_path: Path
) -> None:
    """No handler ran: every tick is missing and the span is reported undelivered,
    exactly where it is in the file; verify fails. A market-wide message that cannot be
    decoded is expected once per raw partition."""
    bad = itch.encode(itch.SystemEvent(0, 0, 0, "C"))
    bad = bad[:5] + (86_400 * NS).to_bytes(6, "big") + bad[11:]  # past midnight
    _, dirty, offset = itch_day(tmp_path, "day", gz=False, tail=itch.frame(bad))
    last = dirty.stat().st_size - len(itch.frame(bad))
    run_replay(
        topics, tmp_path / "m.json", "--source", "itch", "--file", str(dirty), "--date", DAY,
        "--speed", "max",
    )  # fmt: skip
    rc, out = verify_source(topics, dirty, timeout_s=2)
    assert rc == 1, out[-3000:]
    ticks = sum(s.ticks for s in _expect(dirty).symbols.values())
    assert ticks > 0 and summary(out)["missing"] == ticks, out[-3000:]
    span = f"dead letter {dirty.name} @ byte {offset}: 37 bytes, unknown_type"
    assert f"{span}, delivered 0 of 1" in out, out[-3000:]
    bad_line = f"dead letter {dirty.name} @ byte {last}: 12 bytes, bad_timestamp, delivered 0 of 4"
    assert bad_line in out, out[-3000:]
    assert "deadletters=0 expected=5" in out, out[-3000:]


@pytest.mark.slow
async def test_json_lines_source_and_a_bad_line(topics: TopicSet, tmp_path: Path) -> None:
    f = tmp_path / "feed.jsonl"
    lines = [orjson.dumps(x) for x in json_trades("BTC-USD", 40)]
    lines.insert(17, b'{"type": "trade", "symbol": "BTC-USD", "price": "-1"}')
    f.write_bytes(b"\n".join(lines) + b"\n")
    run_replay(topics, tmp_path / "m.json", "--source", "jsonl", "--file", str(f), "--speed", "max")
    h = HandlerProc(topics, tmp_path, "a")
    try:
        rc, out = verify_source(topics, f)
        assert summary(out) == ZERO, out[-3000:]
        assert "ticks read=40 expected=40" in out, out[-3000:]
        assert f"dead letter feed.jsonl line 18: {len(lines[17])} bytes, " in out, out[-3000:]
        assert "delivered 1 of 1" in out and "deadletters=1 expected=1" in out, out[-3000:]
        assert rc == 0, out[-3000:]
    finally:
        h.close()


def _verify_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tickscale", "verify", "--bootstrap", "127.0.0.1:1", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_bad_source_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    event = itch.frame(itch.encode(itch.SystemEvent(0, 0, 1, "O")))
    cut = tmp_path / "cut.itch"
    cut.write_bytes((event * 3)[:-4])
    z = gzip.compress(event * 1000)
    short = tmp_path / "short.itch.gz"
    short.write_bytes(z[: len(z) - 10])
    cases = [
        ([], "error: --manifest: give either --manifest or --source"),
        (["--source", str(tmp_path / "nope.itch")], f"error: --source {tmp_path / 'nope.itch'}:"),
        (["--source", str(cut), "--date", DAY], f"error: {cut} @ byte 28: the file ends inside"),
        (["--source", str(short), "--date", DAY], f"error: {short} @ byte "),
    ]
    for args, needle in cases:
        r = _verify_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert "gzip" in _verify_cli("--source", str(short), "--date", DAY).stderr
