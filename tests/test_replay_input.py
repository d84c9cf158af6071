"""``tickscale replay`` with input a user must fix: one ``error:`` line naming it, exit 2.

Each case runs the real command against the real broker. What can be known in
advance stops the replay before its first record (the raw topic stays empty);
what is found part-way through a file stops it with the manifest of what was
sent, which must match the records on the broker.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.topology import RAW_CONFIG, partitions_of
from ingest.codecs import itch
from ingest.manifest import Manifest
from ingest.replay.source import MAX_LINE_BYTES, ItchWindow, parse_hhmm
from ingest.replay.synthetic import SyntheticDay
from tests.pipeline_utils import json_trades, replay_cmd
from tickscale.localstack.net import free_port
from tickscale.localstack.topics import (
    MakeTopics,
    TopicSet,
    delete_topics,
    ensure_topics,
    list_topics,
)

DAY = "2024-11-25"


def _replay(ts: TopicSet, manifest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        replay_cmd(ts, manifest, "--speed", "max", *args),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_error(r: subprocess.CompletedProcess[str], *names: str) -> str:
    """The run failed with exit 2 and one ``error:`` line naming each of ``names``."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


async def _raw_records(ts: TopicSet) -> int:
    """Records in the raw topic (its partitions' end offsets)."""
    tps = [TopicPartition(ts.raw, p) for p in await partitions_of(ts.bootstrap, ts.raw)]
    consumer = AIOKafkaConsumer(bootstrap_servers=ts.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


def _itch_day() -> bytes:
    msgs = ItchWindow(SyntheticDay(4, 3), None, parse_hhmm("09:31"))
    return b"".join(itch.frame(m.payload) for m in msgs)


def _frames(data: bytes) -> int:
    n = pos = 0
    while pos + 2 <= len(data):
        end = pos + 2 + int.from_bytes(data[pos : pos + 2], "big")
        if end > len(data):
            break
        n += 1
        pos = end
    return n


# --- known in advance: nothing is published ----------------------------------------------


@pytest.mark.parametrize(
    "case", ["manifest-under-a-file", "manifest-is-a-dir", "file-is-a-dir", "no-file", "nan", "inf"]
)
async def test_bad_input_stops_before_the_first_record(
    topics: TopicSet, tmp_path: Path, case: str
) -> None:
    manifest = tmp_path / "m.json"
    args = ["--source", "synthetic", "--date", DAY, "--symbols", "3", "--to", "09:31"]
    names: tuple[str, ...]
    if case == "manifest-under-a-file":
        (tmp_path / "plain").write_text("")
        manifest = tmp_path / "plain" / "m.json"
        names = (str(manifest),)
    elif case == "manifest-is-a-dir":
        manifest = tmp_path
        names = (str(tmp_path),)
    elif case == "file-is-a-dir":
        args = ["--source", "itch", "--date", DAY, "--file", str(tmp_path)]
        names = (str(tmp_path), "not a regular file")
    elif case == "no-file":
        missing = tmp_path / "nope.jsonl"
        args = ["--source", "jsonl", "--file", str(missing)]
        names = (str(missing), "no such file")
    else:
        args += ["--speed", case]
        names = ("--speed", case)
    r = _replay(topics, manifest, *args)
    _one_error(r, *names)
    assert await _raw_records(topics) == 0
    assert not (tmp_path / "m.json").exists()


async def test_a_missing_topic_is_named(topics: TopicSet, tmp_path: Path) -> None:
    ts = TopicSet(
        bootstrap=topics.bootstrap,
        prefix=topics.prefix + "-absent",
        raw_partitions=1,
        ticks_partitions=1,
        deadletter_partitions=1,
    )
    r = _replay(ts, tmp_path / "m.json", "--date", DAY, "--symbols", "3", "--to", "09:31")
    _one_error(r, f"--topic {ts.raw}", "no such topic")
    assert not (tmp_path / "m.json").exists()


async def test_an_unreachable_broker_is_named_after_a_bounded_wait(
    topics: TopicSet, tmp_path: Path
) -> None:
    ts = TopicSet(
        bootstrap=f"127.0.0.1:{free_port()}",
        prefix=topics.prefix,
        raw_partitions=1,
        ticks_partitions=1,
        deadletter_partitions=1,
    )
    r = _replay(ts, tmp_path / "m.json", "--date", DAY, "--to", "09:31", "--connect-timeout", "2")
    _one_error(r, f"--bootstrap {ts.bootstrap}", "no broker answered")
    assert not (tmp_path / "m.json").exists()


async def test_an_unfinished_manifest_is_not_overwritten(topics: TopicSet, tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    Manifest(source="synthetic", topic=topics.raw, partitions=4, complete=False).write(manifest)
    r = _replay(topics, manifest, "--date", DAY, "--symbols", "3", "--to", "09:31")
    _one_error(r, str(manifest), "--resume")
    assert await _raw_records(topics) == 0


async def test_resume_of_another_replay_is_refused(topics: TopicSet, tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    Manifest(
        source="synthetic",
        topic=topics.raw,
        partitions=4,
        complete=False,
        params={"seed": 9, "symbols": 3},
    ).write(manifest)
    r = _replay(topics, manifest, "--resume", "--date", DAY, "--symbols", "3", "--to", "09:31")
    _one_error(r, str(manifest), "seed")
    assert await _raw_records(topics) == 0


async def test_the_same_replay_into_the_topic_that_holds_it_is_refused(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    """A second run of a replay whose complete manifest is there (a second `docker compose
    up` with the first one's volumes) would hand the handlers the whole day twice."""
    ts = await make_topics(raw_partitions=2)
    manifest = tmp_path / "m.json"
    window = ("--symbols", "3", "--from", "09:29", "--to", "09:31")
    assert _replay(ts, manifest, "--date", DAY, *window).returncode == 0
    sent, body = await _raw_records(ts), manifest.read_bytes()
    _one_error(_replay(ts, manifest, "--date", DAY, *window), f"--topic {ts.raw}", str(manifest))
    assert await _raw_records(ts) == sent
    assert manifest.read_bytes() == body
    # Another day, written to the same manifest path, goes out.
    assert _replay(ts, manifest, "--date", "2024-11-26", *window).returncode == 0
    assert await _raw_records(ts) > sent
    # The same replay into the topic deleted and created again since goes out too.
    await delete_topics(ts.bootstrap, [ts.raw])
    deadline = time.monotonic() + 60
    while ts.raw in await list_topics(ts.bootstrap):
        assert time.monotonic() < deadline, "the topic is still listed after its deletion"
        await asyncio.sleep(0.2)
    await ensure_topics(ts.bootstrap, {ts.raw: ts.raw_partitions})
    assert _replay(ts, manifest, "--date", "2024-11-26", *window).returncode == 0
    assert Manifest.read(manifest).records_sent == await _raw_records(ts) > 0


# --- found part-way: the manifest counts what was sent -----------------------------------


def _partial(manifest: Path, sent: int) -> Manifest:
    m = Manifest.read(manifest)
    assert not m.complete
    assert m.source_messages == sent
    return m


async def test_a_truncated_itch_file_ends_with_the_manifest_of_what_was_sent(
    topics: TopicSet, tmp_path: Path
) -> None:
    data = _itch_day()
    f = tmp_path / "day.itch"
    f.write_bytes(data[:-5])  # the last frame loses its tail
    r = _replay(topics, tmp_path / "m.json", "--source", "itch", "--file", str(f), "--date", DAY)
    _one_error(r, f.name)  # the ITCH framing names the file and the byte offset
    m = _partial(tmp_path / "m.json", _frames(data) - 1)
    assert await _raw_records(topics) == m.records_sent > 0


async def test_a_gzip_file_cut_short_is_named(topics: TopicSet, tmp_path: Path) -> None:
    gz = gzip.compress(_itch_day())
    f = tmp_path / "day.itch.gz"
    f.write_bytes(gz[: len(gz) * 2 // 3])
    r = _replay(topics, tmp_path / "m.json", "--source", "itch", "--file", str(f), "--date", DAY)
    _one_error(r, f.name)  # the ITCH framing names the file and the byte offset
    m = Manifest.read(tmp_path / "m.json")
    assert not m.complete
    assert await _raw_records(topics) == m.records_sent


async def test_an_oversize_jsonl_line_is_named_by_its_number(
    topics: TopicSet, tmp_path: Path
) -> None:
    lines = [orjson.dumps(t) for t in json_trades("AAA", 40)]
    lines.insert(25, b'{"pad": "' + b"x" * (10 << 20) + b'"}')  # 10 MB: line 26
    f = tmp_path / "feed.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    r = _replay(topics, tmp_path / "m.json", "--source", "jsonl", "--file", str(f))
    _one_error(r, f"{f} line 26", "--max-line-bytes")
    m = _partial(tmp_path / "m.json", 25)
    assert await _raw_records(topics) == m.records_sent == 25


async def test_every_jsonl_line_accepted_fits_the_raw_topic(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    """md.raw takes 1 MiB a record batch; the line limit was 1 MiB too, so a line near
    it passed the replay's check, the broker refused its batch, and the replay ended
    without a manifest. The limit now leaves room for the record's framing."""
    ts = await make_topics(raw_partitions=1, configs=RAW_CONFIG)
    good = [orjson.dumps(t) for t in json_trades("AAA", 20)]

    def pad(n: int) -> bytes:  # incompressible, though nothing compresses md.raw now
        return base64.b64encode(os.urandom(n))[:n]

    fits = tmp_path / "fits.jsonl"
    fits.write_bytes(b"\n".join([*good[:10], pad(MAX_LINE_BYTES), *good[10:]]) + b"\n")
    r = _replay(ts, tmp_path / "fits.json", "--source", "jsonl", "--file", str(fits))
    assert r.returncode == 0, r.stderr[-3000:]
    m = Manifest.read(tmp_path / "fits.json")
    assert m.complete and m.records_sent == 21 and m.deadletters_expected == 1

    # A line the old limit let through, and the broker refused: named, with the
    # manifest of the lines before it.
    over = tmp_path / "over.jsonl"
    over.write_bytes(b"\n".join([*good[:10], pad((1 << 20) - 20), *good[10:]]) + b"\n")
    r = _replay(ts, tmp_path / "over.json", "--source", "jsonl", "--file", str(over))
    _one_error(r, f"{over} line 11", "--max-line-bytes")
    assert _partial(tmp_path / "over.json", 10).records_sent == 10

    # A topic made to take less than md.raw does: the refusal names it and the fix.
    small = await make_topics(raw_partitions=1, configs={"max.message.bytes": "2000"})
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"\n".join([*good[:10], pad(3000), *good[10:]]) + b"\n")
    r = _replay(small, tmp_path / "big.json", "--source", "jsonl", "--file", str(big))
    _one_error(r, f"--topic {small.raw}", "max.message.bytes", "--max-line-bytes")


# --- forwarded for the handler to dead-letter --------------------------------------------


async def test_lines_the_replay_cannot_route_are_sent_and_expected_as_dead_letters(
    topics: TopicSet, tmp_path: Path
) -> None:
    good = [orjson.dumps(t) for t in json_trades("AAA", 10)]
    too_big = {**json_trades("AAA", 1)[0], "trade_id": "big"}
    lines = [
        *good[:5],
        # Past 64 bits (orjson writes no such integer: spliced in as text), and past
        # a signed 64-bit time.
        orjson.dumps(too_big).replace(b"1732545000000000000", str(2**64 + 5).encode()),
        orjson.dumps({**too_big, "ts": 2**63}),
        b"{not json",
        *good[5:],
    ]
    f = tmp_path / "feed.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    r = _replay(topics, tmp_path / "m.json", "--source", "jsonl", "--file", str(f))
    assert r.returncode == 0, r.stderr[-3000:]
    m = Manifest.read(tmp_path / "m.json")
    assert m.complete
    assert m.source_messages == m.records_sent == len(lines)
    assert m.deadletters_expected == 3
    assert m.symbols["AAA"].ticks == 10
    assert await _raw_records(topics) == len(lines)


async def test_resume_with_a_shorter_source_is_refused(topics: TopicSet, tmp_path: Path) -> None:
    lines = [orjson.dumps(t) for t in json_trades("AAA", 40)]
    f = tmp_path / "feed.jsonl"
    f.write_bytes(b"\n".join([*lines[:30], b"x" * 2048, *lines[30:]]) + b"\n")
    manifest = tmp_path / "m.json"
    r = _replay(topics, manifest, "--source", "jsonl", "--file", str(f), "--max-line-bytes", "1024")
    _one_error(r, f"{f} line 31")
    before = _partial(manifest, 30)
    f.write_bytes(b"\n".join(lines[:10]) + b"\n")  # not the file the manifest counts
    r = _replay(
        topics, manifest, "--resume", "--source", "jsonl", "--file", str(f),
        "--max-line-bytes", "1024",
    )  # fmt: skip
    _one_error(r, "--resume", "ends after 10 messages")
    assert Manifest.read(manifest) == before
    assert await _raw_records(topics) == 30
