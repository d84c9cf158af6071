"""A replay that is stopped, killed or loses its broker still sends every message once.

The real ``tickscale replay`` command against the real broker; what reached the
raw topic is read back and compared, partition by partition, with the records
the source makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.constants import HDR_SEQ
from ingest.keys import partition_for
from ingest.manifest import Manifest, ManifestBuilder
from ingest.replay.publisher import Replayer, ReplayerOptions
from ingest.replay.spec import SourceSpec
from tests.pipeline_utils import replay_cmd, run_replay, start_replay
from tickscale.localstack import KafkaBroker
from tickscale.localstack.topics import (
    MakeTopics,
    TopicSet,
    delete_topics,
    ensure_topics,
    list_topics,
)

# Every test stops, kills or outlasts a real replay against a real broker.
pytestmark = pytest.mark.slow

DAY = "2024-11-25"
# About 22,000 messages over 16 minutes of the open.
SPEC = SourceSpec(source="synthetic", symbols=5, seed=3, day=DAY, start="09:29", end="09:45")
SOURCE_ARGS = [
    "--source", "synthetic", "--symbols", "5", "--seed", "3", "--date", DAY,
    "--from", "09:29", "--to", "09:45", "--checkpoint-every", "1",
]  # fmt: skip


def _expected(partitions: int) -> tuple[dict[int, list[bytes]], Manifest]:
    """Each partition's payloads in order, and the manifest of the whole replay."""
    src, _, day, _ = SPEC.build()
    by_part: dict[int, list[bytes]] = defaultdict(list)
    b = ManifestBuilder()
    for m in src:
        targets = range(partitions) if m.key is None else (partition_for(m.key, partitions),)
        for p in targets:
            by_part[p].append(m.payload)
        b.observe(m.payload, m.codec, day, len(targets))
    return by_part, b.build(source="synthetic", topic="", partitions=partitions)


async def _read_raw(ts: TopicSet) -> dict[int, list[tuple[int, bytes]]]:
    """(feed sequence number, payload) of every record in each raw partition."""
    tps = [TopicPartition(ts.raw, p) for p in range(ts.raw_partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=ts.bootstrap, enable_auto_commit=False)
    await consumer.start()
    got: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        async with asyncio.timeout(120):
            while any([await consumer.position(tp) < ends[tp] for tp in tps]):
                for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                    for r in records:
                        got[tp.partition].append((int(dict(r.headers)[HDR_SEQ]), r.value or b""))
    finally:
        await consumer.stop()
    return got


async def _assert_exactly_once(ts: TopicSet, manifest: Path) -> None:
    expected, whole = _expected(ts.raw_partitions)
    got = await _read_raw(ts)
    for p in range(ts.raw_partitions):
        seqs = [s for s, _ in got[p]]
        assert seqs == list(range(1, len(expected[p]) + 1)), f"partition {p}"
        assert [v for _, v in got[p]] == expected[p], f"partition {p}"
    m = Manifest.read(manifest)
    assert m.complete
    assert m.source_messages == whole.source_messages
    assert m.records_sent == sum(len(v) for v in expected.values())
    assert m.partition_seqs == [len(expected[p]) for p in range(ts.raw_partitions)]
    # The resumed manifest is the one a replay in one go writes: what verify checks.
    assert m.symbols == whole.symbols
    assert m.deadletters_expected == whole.deadletters_expected


def _wait_for_checkpoint(proc: subprocess.Popen[bytes], manifest: Path, timeout: float) -> int:
    """Messages counted by the first manifest that counts any."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the replay ended before its first checkpoint"
        if manifest.exists():
            m = Manifest.read(manifest)
            if m.source_messages > 1000:
                return m.source_messages
        time.sleep(0.2)
    raise TimeoutError("no checkpoint")


async def _resume(topics: TopicSet, manifest: Path) -> subprocess.CompletedProcess[str]:
    """``replay --resume`` of the replay that wrote ``manifest``, at full speed."""
    return await asyncio.to_thread(
        subprocess.run,
        replay_cmd(topics, manifest, "--speed", "max", "--resume", *SOURCE_ARGS),
        capture_output=True,
        text=True,
        timeout=300,
    )


async def _stop_after_checkpoint(
    topics: TopicSet, tmp_path: Path, sig: signal.Signals, after_s: float
) -> tuple[int, str]:
    """A replay into ``topics`` (manifest ``tmp_path/m.json``) sent ``sig`` ``after_s``
    after its first checkpoint: its exit status and the end of its log."""
    manifest = tmp_path / "m.json"
    log = tmp_path / "replay.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            replay_cmd(topics, manifest, "--speed", "30", *SOURCE_ARGS),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            await asyncio.to_thread(_wait_for_checkpoint, proc, manifest, 120)
            await asyncio.sleep(after_s)
            proc.send_signal(sig)
            rc = await asyncio.to_thread(proc.wait, 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, log.read_text()[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
async def test_a_stopped_replay_resumes_without_duplicates(
    topics: TopicSet, tmp_path: Path, sig: signal.Signals
) -> None:
    manifest = tmp_path / "m.json"
    # Past a checkpoint, with records in flight.
    rc, log = await _stop_after_checkpoint(topics, tmp_path, sig, 1.5)
    assert rc == (1 if sig == signal.SIGTERM else -signal.SIGKILL), log
    stopped = Manifest.read(manifest)
    assert not stopped.complete
    on_broker = sum(len(v) for v in (await _read_raw(topics)).values())
    if sig == signal.SIGTERM:
        # An orderly stop counts everything it sent.
        assert on_broker == stopped.records_sent
    else:
        # Killed: what went out after the last checkpoint is on the broker, uncounted.
        assert on_broker >= stopped.records_sent

    r = await _resume(topics, manifest)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    await _assert_exactly_once(topics, manifest)


async def test_a_replay_killed_before_its_first_checkpoint_resumes_without_duplicates(
    topics: TopicSet, tmp_path: Path
) -> None:
    """Its manifest is written before the first record: killed before a checkpoint, the
    replay used to leave none, so running it again sent its first records twice."""
    manifest = tmp_path / "m.json"
    # A run before it into the same topic: its records are numbered from 1 too, and a
    # resume must not take them for the killed run's.
    run_replay(topics, tmp_path / "before.json", "--speed", "max", *SOURCE_ARGS[:8],
               "--from", "09:29", "--to", "09:31")  # fmt: skip
    before = sum(len(v) for v in (await _read_raw(topics)).values())
    args = [*SOURCE_ARGS[:-2], "--checkpoint-every", "600"]
    with (tmp_path / "replay.log").open("wb") as out:
        proc = subprocess.Popen(
            replay_cmd(topics, manifest, "--speed", "30", *args), stdout=out, stderr=out
        )
        try:
            deadline = time.monotonic() + 60
            while sum(len(v) for v in (await _read_raw(topics)).values()) <= before + 100:
                assert proc.poll() is None and time.monotonic() < deadline
                await asyncio.sleep(0.2)
            proc.kill()
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stopped = Manifest.read(manifest)
    assert not stopped.complete and stopped.source_messages == 0
    # A fresh run is refused: it would send the records already on the broker again.
    r = await asyncio.to_thread(
        subprocess.run, replay_cmd(topics, manifest, "--speed", "max", *SOURCE_ARGS),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "did not finish" in r.stderr, r.stderr[-3000:]
    r = await _resume(topics, manifest)
    assert r.returncode == 0, r.stderr[-3000:]
    got = await _read_raw(topics)
    expected, _ = _expected(topics.raw_partitions)
    for p in range(topics.raw_partitions):
        # The earlier run's records, then this replay's, each once and in order.
        mine = [v for _, v in got[p]][-len(expected[p]) :]
        assert mine == expected[p], f"partition {p}"
    assert sum(len(v) for v in got.values()) == before + sum(len(v) for v in expected.values())


@pytest.mark.parametrize("timestamps", ["CreateTime", "LogAppendTime"])
async def test_a_resume_from_an_older_checkpoint_sends_nothing_twice(
    make_topics: MakeTopics, tmp_path: Path, timestamps: str
) -> None:
    """What reached the broker after the manifest a resume starts from (a replay killed
    between checkpoints) is found on the broker and not sent again, whichever clock
    stamps the records (md.raw's is the broker's)."""
    topics = await make_topics(raw_partitions=4, configs={"message.timestamp.type": timestamps})
    checkpoints: list[Manifest] = []
    src, _, day, _ = SPEC.build()
    msgs = list(src)
    first = Replayer(
        topics.bootstrap,
        topics.raw,
        msgs[: len(msgs) // 2],
        40.0,
        day,
        options=ReplayerOptions(
            checkpoint=lambda m: checkpoints.append(m.model_copy(deep=True)),
            checkpoint_every_s=0.5,
        ),
    )
    await first.run()
    older = [m for m in checkpoints if 0 < m.source_messages < len(msgs) // 2]
    assert older, [m.source_messages for m in checkpoints]
    stale = older[len(older) // 2]
    stale.source = "synthetic"
    rest = Replayer(
        topics.bootstrap, topics.raw, msgs, None, day, options=ReplayerOptions(resume=stale)
    )
    m = await rest.run()
    assert rest.stats.resumed_messages == stale.source_messages
    m.write(tmp_path / "m.json")
    await _assert_exactly_once(topics, tmp_path / "m.json")


async def test_a_replay_rides_out_a_broker_outage(
    topics: TopicSet, kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.json"
    log = tmp_path / "replay.log"
    with log.open("wb") as out:
        # About 80 s of sending: the broker goes away in the middle of it.
        proc = subprocess.Popen(
            replay_cmd(topics, manifest, "--speed", "12", "--outage-deadline", "240", *SOURCE_ARGS),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            await asyncio.to_thread(_wait_for_checkpoint, proc, manifest, 120)
            await asyncio.to_thread(kafka_broker.stop)
            await asyncio.sleep(45)
            assert proc.poll() is None, log.read_text()[-3000:]
            await asyncio.to_thread(kafka_broker.start)
            rc = await asyncio.to_thread(proc.wait, 400)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if not kafka_broker.running:
                kafka_broker.start()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "acknowledged nothing" in text  # the outage happened while it sent
    assert "Traceback" not in text
    await _assert_exactly_once(topics, manifest)


@pytest.mark.parametrize("stop_it", [False, True], ids=["deadline", "sigterm"])
async def test_past_the_outage_deadline_the_replay_stops_and_resumes_later(
    topics: TopicSet, kafka_broker: KafkaBroker, tmp_path: Path, stop_it: bool
) -> None:
    """Past the deadline, or asked to stop while the broker is away (not kept waiting
    for the deadline, here far off)."""
    manifest = tmp_path / "m.json"
    log = tmp_path / "replay.log"
    args = ["--speed", "20", "--outage-deadline", "300" if stop_it else "10", *SOURCE_ARGS]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            replay_cmd(topics, manifest, *args),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            await asyncio.to_thread(_wait_for_checkpoint, proc, manifest, 120)
            await asyncio.to_thread(kafka_broker.stop)
            if stop_it:
                await asyncio.sleep(2)
                proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            await asyncio.to_thread(kafka_broker.start)
    text = log.read_text()
    assert rc == 1, text[-3000:]
    assert "Traceback" not in text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text[-3000:]
    assert f"--bootstrap {topics.bootstrap}" in errors[0]
    assert ("stopped while" if stop_it else "--outage-deadline") in errors[0]
    assert not Manifest.read(manifest).complete

    r = await _resume(topics, manifest)
    assert r.returncode == 0, r.stderr[-3000:]
    await _assert_exactly_once(topics, manifest)


async def test_a_resume_into_a_topic_created_again_is_refused(
    topics: TopicSet, tmp_path: Path
) -> None:
    """The manifest belongs to one incarnation of the raw topic: resuming into the same
    name deleted and created again would skip what the earlier run sent (it is gone with
    the old log) and leave a hole in the day. It is refused, naming the topic, before
    anything is sent."""
    manifest = tmp_path / "m.json"
    rc, log = await _stop_after_checkpoint(topics, tmp_path, signal.SIGTERM, 0.0)
    assert rc == 1, log
    stopped = Manifest.read(manifest)
    assert stopped.topic_id and not stopped.complete
    await delete_topics(topics.bootstrap, [topics.raw])
    async with asyncio.timeout(30):  # deletion is asynchronous
        while topics.raw in await list_topics(topics.bootstrap):
            await asyncio.sleep(0.2)
    await ensure_topics(topics.bootstrap, {topics.raw: topics.raw_partitions})

    r = await _resume(topics, manifest)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert f"--topic {topics.raw}" in errors[0] and "deleted and created again" in errors[0]
    assert stopped.topic_id in errors[0], errors[0]
    assert sum(len(v) for v in (await _read_raw(topics)).values()) == 0
    assert Manifest.read(manifest) == stopped


@pytest.mark.parametrize("again", [False, True], ids=["deleted", "deleted-and-created-again"])
async def test_a_topic_deleted_under_a_running_replay_is_named(
    topics: TopicSet, tmp_path: Path, again: bool
) -> None:
    """The raw topic deleted mid-replay takes what was sent with it. The client only
    retries, as for an absent broker, but the broker is there: the replay names the topic
    soon (not after --outage-deadline) and never writes a manifest calling the day sent,
    also when the topic is created again and the rest of the day went to the new one."""
    manifest = tmp_path / "m.json"
    log = tmp_path / "replay.log"
    args = ["--speed", "20", "--outage-deadline", "150", *SOURCE_ARGS]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            replay_cmd(topics, manifest, *args), stdout=out, stderr=subprocess.STDOUT
        )
        try:
            await asyncio.to_thread(_wait_for_checkpoint, proc, manifest, 120)
            began = Manifest.read(manifest).topic_id
            await delete_topics(topics.bootstrap, [topics.raw])
            deleted = time.monotonic()
            if again:
                async with asyncio.timeout(30):  # deletion is asynchronous
                    while topics.raw in await list_topics(topics.bootstrap):
                        await asyncio.sleep(0.1)
                await ensure_topics(topics.bootstrap, {topics.raw: topics.raw_partitions})
            rc = await asyncio.to_thread(proc.wait, 120)
            took = time.monotonic() - deleted
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert rc == 1 and "Traceback" not in text, text[-3000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --topic {topics.raw}: "), errors
    said = "was deleted and created again during the replay" if again else "was deleted during"
    assert said in errors[0] and "without --resume" in errors[0], errors[0]
    if again:
        assert began and began in errors[0], errors[0]
    assert took < 60, (took, text[-3000:])  # well before the 150 s outage deadline
    assert not Manifest.read(manifest).complete


async def test_a_full_disk_does_not_stop_the_feed_and_resume_writes_the_manifest(
    topics: TopicSet, tmp_path: Path, small_disk: Path
) -> None:
    """The manifest's disk fills during the replay: every message is still sent, the
    replay says so once and exits 1 with one line naming --manifest, leaves no half
    written file, and ``--resume`` once there is room writes the whole day's manifest."""
    disk = small_disk
    manifest = disk / "m.json"
    log = tmp_path / "replay.log"
    proc = start_replay(topics, manifest, log, "--speed", "60", *SOURCE_ARGS)
    try:
        counted = await asyncio.to_thread(_wait_for_checkpoint, proc, manifest, 60)
        filler = disk / "filler"
        with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        code = await asyncio.to_thread(proc.wait, 120)
    finally:
        proc.kill()
    text = log.read_text(errors="replace")
    assert code == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"error: --manifest {manifest}: cannot write it"), text[-3000:]
    assert "--resume" in last
    assert text.count("cannot write the manifest") == 1, text[-3000:]
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "m.json"]  # no .tmp left
    m = Manifest.read(manifest)
    assert not m.complete and m.source_messages >= counted
    # Every message reached the broker all the same: the resume sends nothing again.
    filler.unlink()
    r = await _resume(topics, manifest)
    assert r.returncode == 0, r.stderr[-3000:]
    await _assert_exactly_once(topics, manifest)
