"""Reaching the broker at start: an absent broker is waited for with backoff and then named
in one line; a missing topic or a refused request is named at once; nothing started is
left open.

Each command case runs the real command against the real broker (or a port nothing
listens on: the one fault here that needs no broker at all).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from core import constants as c
from core.reach import BrokerLost, BrokerUnreachable, Outage, reach_topics
from core.topology import TopicMissing, partitions_of
from ingest.codecs.errors import SourceError
from ingest.handler.service import FeedHandler
from ingest.handler.settings import HandlerSettings
from ingest.manifest import Manifest
from ingest.replay.outage import reach_topic
from tests.pipeline_utils import HandlerProc, run_replay, run_verify, summary
from tickscale.localstack.kafka import KafkaBroker
from tickscale.localstack.net import free_port
from tickscale.localstack.topics import TopicSet, delete_topics, ensure_topics


def _tickscale(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tickscale", *args], capture_output=True, text=True, timeout=timeout
    )


def _one_error(r: subprocess.CompletedProcess[str], *names: str) -> str:
    """The command failed with exit 2 and one ``error:`` line naming each of ``names``."""
    out = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 2, out
    assert "Traceback" not in r.stderr, out
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


def _absent() -> str:
    """An address on this machine where no broker listens."""
    return f"127.0.0.1:{free_port()}"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


# --- the wait itself -------------------------------------------------------------------


async def test_a_wait_for_an_absent_broker_backs_off_and_names_the_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    addr = _absent()
    cpu0, t0 = time.process_time(), time.monotonic()
    with caplog.at_level(logging.WARNING, logger="core.reach"):
        with pytest.raises(SourceError) as info:
            await reach_topic(addr, "md.raw", 3.0)
    cpu, waited = time.process_time() - cpu0, time.monotonic() - t0
    assert info.value.where == f"--bootstrap {addr}"
    assert "no broker answered within 3 s" in info.value.what
    # The whole wait, not a first refusal: the deadline is the caller's.
    assert waited >= 2.9
    # Backoff between attempts, not a loop asking as fast as the client can fail (which
    # took most of a core for the whole wait).
    assert cpu < 1.0, f"{cpu:.2f} s of CPU in a {waited:.1f} s wait"
    retries = [r for r in caplog.records if r.name == "core.reach"]
    assert 2 <= len(retries) <= 8, [r.getMessage() for r in retries]
    # The same wait for the handler and verify, as its own exception.
    with pytest.raises(BrokerUnreachable, match=f"--bootstrap {addr}: no broker answered"):
        await reach_topics(addr, ["md.raw", "md.ticks"], 0.5)


def test_an_outage_mid_run_backs_off_and_ends_at_its_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The bookkeeping of a broker lost mid-run (tests/test_verify_outage.py has the real
    one): waits grow, the client's own lines are held back only while the broker is away,
    an answer ends the absence, and one that lasts past the limit is BrokerLost."""
    client_log = logging.getLogger("aiokafka")
    before = client_log.level
    with caplog.at_level(logging.WARNING, logger="core.reach"):
        with Outage("127.0.0.1:1", 60.0, "reading t", "--outage-deadline") as outage:
            assert outage.answered() == 0.0
            waits = [outage.failed(TimeoutError(), time.monotonic()) for _ in range(4)]
            assert waits == sorted(waits) and waits[0] < 0.5 and waits[-1] >= 1.0, waits
            assert client_log.level == logging.CRITICAL
            assert 0.0 < outage.answered() < 5.0
            assert client_log.level == before
            # A new absence counts from its own first probe; one begun 61 s ago is over.
            with pytest.raises(BrokerLost) as info:
                outage.failed(TimeoutError(), time.monotonic() - 61.0)
        assert client_log.level == before  # also when the run ends inside the absence
    assert info.value.where == "--bootstrap 127.0.0.1:1"
    assert "while reading t and did not answer for 60 s (--outage-deadline)" in info.value.what
    assert "nothing was concluded" in info.value.what
    lines = [r.getMessage() for r in caplog.records if r.name == "core.reach"]
    assert sum("no answer from the broker" in ln for ln in lines) == 4, lines
    assert sum("is back after" in ln for ln in lines) == 1, lines


async def test_a_missing_topic_is_named_at_once_or_waited_for(topics: TopicSet) -> None:
    missing = f"{topics.prefix}.nothing"
    # A long connect timeout: only an answer at once passes.
    async with asyncio.timeout(30):
        with pytest.raises(TopicMissing) as info:
            await reach_topics(topics.bootstrap, [topics.raw, missing], 600)
        found = await reach_topics(topics.bootstrap, [topics.raw, topics.ticks], 600)
    assert info.value.topic == missing
    assert found == {topics.raw: [0, 1, 2, 3], topics.ticks: [0, 1, 2, 3]}
    # A service waits for it, and takes it once made.
    later = f"{topics.prefix}.later"
    waiting = asyncio.ensure_future(
        reach_topics(topics.bootstrap, [topics.raw, later], 60, wait_for_topics=True)
    )
    try:
        await asyncio.sleep(1.5)
        assert not waiting.done()
        await ensure_topics(topics.bootstrap, {later: 2})
        async with asyncio.timeout(30):
            assert (await waiting)[later] == [0, 1]
    finally:
        waiting.cancel()
        await delete_topics(topics.bootstrap, [later])
    with pytest.raises(TopicMissing):
        await reach_topics(topics.bootstrap, [missing], 1, wait_for_topics=True)


# --- the handler ------------------------------------------------------------------------


def test_a_handler_without_a_broker_exits_naming_the_address() -> None:
    addr = _absent()
    r = _tickscale("handler", "--bootstrap", addr, "--connect-timeout", "2", "--metrics-port", "0")
    _one_error(r, f"--bootstrap {addr}", "no broker answered within 2 s")
    assert "retry 1" in r.stderr  # it did wait, saying so


def test_a_handler_whose_topic_stays_missing_names_it(topics: TopicSet) -> None:
    missing = f"{topics.prefix}.nothing"
    common = ["handler", "--bootstrap", topics.bootstrap, "--in", topics.raw,
              "--group", topics.group, "--metrics-port", "0", "--connect-timeout", "2"]  # fmt: skip
    r = _tickscale(*common, "--out", missing, "--deadletter", topics.deadletter, timeout=30)
    _one_error(r, f"--out {missing}", "no such topic")
    assert f"no topic {missing} on {topics.bootstrap} yet; retry 1" in r.stderr
    r = _tickscale(*common, "--out", topics.ticks, "--deadletter", missing, timeout=30)
    _one_error(r, f"--deadletter {missing}", "no such topic")


async def test_a_handler_that_fails_to_start_closes_what_it_opened(topics: TopicSet) -> None:
    port = free_port()
    s = HandlerSettings(
        bootstrap=topics.bootstrap, in_topic=topics.raw, out_topic=f"{topics.prefix}.nothing",
        deadletter_topic=topics.deadletter, group=topics.group, metrics_port=port,
        handler_id=f"reach-{uuid.uuid4().hex[:6]}", connect_timeout_s=1,
    )  # fmt: skip
    async with asyncio.timeout(30):
        with pytest.raises(TopicMissing):
            async with FeedHandler(s):
                pass
    # The probes' port is closed with the rest: a supervisor restarting the handler in
    # this process (or a test) finds it free.
    assert _port_free(port)


@pytest.mark.slow
async def test_a_handler_started_before_its_broker_waits_and_then_delivers(
    tmp_path: Path,
) -> None:
    port = free_port()
    ts = TopicSet(
        bootstrap=f"127.0.0.1:{port}", prefix="t-reach", raw_partitions=2, ticks_partitions=2,
        deadletter_partitions=1,
    )  # fmt: skip
    h = HandlerProc(ts, tmp_path, "early", extra=["--connect-timeout", "120"])
    broker = KafkaBroker(tmp_path / "kafka", port=port, start_timeout=60)
    try:
        deadline = time.monotonic() + 30
        while "no broker at" not in h.log():
            assert h.proc.poll() is None, h.log()
            assert time.monotonic() < deadline, h.log()
            await asyncio.sleep(0.2)
        await asyncio.to_thread(broker.start)
        await ensure_topics(ts.bootstrap, {ts.raw: 2, ts.ticks: 2, ts.deadletter: 1})
        await asyncio.to_thread(h.wait_ready, 90)
        manifest = tmp_path / "m.json"
        await asyncio.to_thread(
            run_replay, ts, manifest, "--symbols", "4", "--speed", "max", "--from", "09:30",
            "--to", "09:32",
        )  # fmt: skip
        rc, out = await asyncio.to_thread(run_verify, ts, manifest, 90)
        assert rc == 0, out[-3000:]
        got = summary(out)
        assert got == {"missing": 0, "duplicated": 0, "reordered": 0, "checksum_mismatch": 0}
        assert Manifest.read(manifest).records_sent > 0
    finally:
        h.close()
        await asyncio.to_thread(broker.stop)


# --- topics and verify -------------------------------------------------------------------

# The topics command makes the pipeline's own names, which no other test keeps.
_PIPELINE_TOPICS = [c.RAW_TOPIC, c.TICKS_TOPIC, c.DEADLETTER_TOPIC]


async def _without_pipeline_topics(bootstrap: str) -> None:
    """Delete the pipeline's topics and wait until the broker lists none of them (deletion
    is asynchronous: a topic still listed would count as existing to the next creator)."""
    await delete_topics(bootstrap, _PIPELINE_TOPICS)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        async with asyncio.timeout(30):
            while set(_PIPELINE_TOPICS) & set(await admin.list_topics()):
                await asyncio.sleep(0.2)
    finally:
        await admin.close()


def test_the_topics_command_without_a_broker_names_the_address() -> None:
    addr = _absent()
    r = _tickscale("topics", "--bootstrap", addr, "--connect-timeout", "1")
    _one_error(r, f"--bootstrap {addr}", "no broker answered within 1 s")


async def test_the_topics_command_names_a_refused_replication(kafka_bootstrap: str) -> None:
    await _without_pipeline_topics(kafka_bootstrap)
    try:
        r = await asyncio.to_thread(
            _tickscale, "topics", "--bootstrap", kafka_bootstrap, "--replication", "3"
        )
        _one_error(r, "--replication 3", "only 1 broker")
        with pytest.raises(TopicMissing):
            await partitions_of(kafka_bootstrap, c.RAW_TOPIC)
    finally:
        await _without_pipeline_topics(kafka_bootstrap)


async def test_the_topics_command_says_an_existing_count_was_kept(kafka_bootstrap: str) -> None:
    await _without_pipeline_topics(kafka_bootstrap)
    try:
        await ensure_topics(kafka_bootstrap, {c.RAW_TOPIC: 2})
        r = await asyncio.to_thread(
            _tickscale, "topics", "--bootstrap", kafka_bootstrap, "--raw-partitions", "4"
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"topic {c.RAW_TOPIC} exists with 2 partitions, not 4" in r.stderr
        assert len(await partitions_of(kafka_bootstrap, c.RAW_TOPIC)) == 2
    finally:
        await _without_pipeline_topics(kafka_bootstrap)


def test_verify_names_a_file_that_is_not_a_manifest(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"symbols": [1, 2')
    _one_error(_tickscale("verify", "--manifest", str(broken)), f"--manifest {broken}", "JSON")
    other = tmp_path / "other.json"
    other.write_text('{"hello": "world"}')
    _one_error(
        _tickscale("verify", "--manifest", str(other)), f"--manifest {other}", "not a manifest"
    )


def test_verify_names_an_absent_broker_and_a_missing_topic(
    topics: TopicSet, tmp_path: Path
) -> None:
    m = tmp_path / "m.json"
    Manifest(source="synthetic", topic=topics.raw, partitions=4).write(m)
    addr = _absent()
    r = _tickscale("verify", "--manifest", str(m), "--bootstrap", addr, "--connect-timeout", "1")
    _one_error(r, f"--bootstrap {addr}", "no broker answered")
    missing = f"{topics.prefix}.nothing"
    common = ["verify", "--manifest", str(m), "--bootstrap", topics.bootstrap]
    r = _tickscale(*common, "--topic", missing, "--deadletter-topic", topics.deadletter)
    _one_error(r, f"--topic {missing}", "no such topic")
    r = _tickscale(*common, "--topic", topics.ticks, "--deadletter-topic", missing)
    _one_error(r, f"--deadletter-topic {missing}", "no such topic")
    # And with both there, an empty manifest against empty topics is a pass.
    r = _tickscale(*common, "--topic", topics.ticks, "--deadletter-topic", topics.deadletter)
    assert r.returncode == 0, r.stderr[-3000:]
