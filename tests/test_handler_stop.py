"""A handler process ends promptly on SIGTERM whatever it is doing, and a taken
metrics port is one error line, not a traceback.

Real ``tickscale handler`` processes against the real broker: a stop in the
middle of a long restore, and one while the partition's offset is held by a
transaction nobody will finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from core.incarnation import offset_metadata, topic_id
from ingest.handler.settings import HandlerSettings
from tests.pipeline_utils import HandlerProc
from tickscale.localstack import KafkaBroker
from tickscale.localstack.net import free_port
from tickscale.localstack.topics import MakeTopics, TopicSet

GRACE = HandlerSettings.model_fields["stop_grace_s"].default
# What a process needs beyond its own stop to be reaped on a loaded machine.
EXIT_SLACK_S = 5.0


async def _fill(ts: TopicSet, n: int) -> int:
    """``n`` small records into raw partition 0 (no headers: the handler dead-letters
    them, and a replay skips through them cheaply). Returns the log end."""
    p = AIOKafkaProducer(bootstrap_servers=ts.bootstrap, max_batch_size=1024 * 1024, acks=1)
    await p.start()
    try:
        futures = []
        b = p.create_batch()
        for i in range(n):
            v = b"%d" % i
            if b.append(key=None, value=v, timestamp=None) is None:
                futures.append(await p.send_batch(b, ts.raw, partition=0))
                b = p.create_batch()
                b.append(key=None, value=v, timestamp=None)
        futures.append(await p.send_batch(b, ts.raw, partition=0))
        await asyncio.gather(*futures)
    finally:
        await p.stop()
    c = AIOKafkaConsumer(bootstrap_servers=ts.bootstrap)
    await c.start()
    try:
        tp = TopicPartition(ts.raw, 0)
        return int((await c.end_offsets([tp]))[tp])
    finally:
        await c.stop()


async def _commit(ts: TopicSet, offset: int) -> None:
    """A commit of this incarnation of the topic at ``offset`` for the handlers' group."""
    c = AIOKafkaConsumer(bootstrap_servers=ts.bootstrap, group_id=ts.group)
    await c.start()
    try:
        tp = TopicPartition(ts.raw, 0)
        meta = offset_metadata("tickscale.test", await topic_id(c, ts.raw))
        c.assign([tp])
        await c.commit({tp: (offset, meta)})
    finally:
        await c.stop()


async def _wait_for_log(h: HandlerProc, pattern: str) -> re.Match[str]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = re.search(pattern, h.log_path.read_text(errors="replace"))
        if m:
            return m
        assert h.proc.poll() is None, h.log()
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in the handler's log: {h.log()}")


def _stop_within_grace(h: HandlerProc) -> str:
    """SIGTERM; the process must end by itself within its stop grace, exit 0."""
    try:
        rc = h.terminate(timeout=GRACE + EXIT_SLACK_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {GRACE + EXIT_SLACK_S}s after SIGTERM") from None
    log = h.log_path.read_text(errors="replace")
    assert rc == 0, log[-3000:]
    assert "stopped after" in log and "Traceback" not in log, log[-3000:]
    return log


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except urllib.error.HTTPError:
        return False


@pytest.mark.slow
async def test_sigterm_mid_restore_ends_the_handler(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    """The restore of a large partition (a full replay: no Redis) runs inside the
    assignment callback; SIGTERM must end it, not wait for it."""
    ts = await make_topics(raw_partitions=1)
    end = await _fill(ts, 2_000_000)
    await _commit(ts, end)
    h = HandlerProc(ts, tmp_path, "a")
    try:
        await _wait_for_log(h, rf"replaying offsets 0 to {end} to restore")
        await asyncio.sleep(0.5)
        assert "restored at offset" not in h.log_path.read_text(), "the restore was too quick"
        log = _stop_within_grace(h)
        assert "gave up trying to restore" in log, log[-3000:]
        assert "restored at offset" not in log, log[-3000:]
    finally:
        h.close()


@pytest.mark.slow
async def test_sigterm_while_the_offset_is_held_open(
    make_topics: MakeTopics, tmp_path: Path
) -> None:
    """A transaction outside the handlers' fleet holds the partition's offset open (it
    is never fenced: not a handler's transactional id) and will not end for ten
    minutes; the handler waits for it, and SIGTERM must end that wait."""
    ts = await make_topics(raw_partitions=1)
    await _fill(ts, 10)
    tp = TopicPartition(ts.raw, 0)
    other = AIOKafkaProducer(
        bootstrap_servers=ts.bootstrap,
        transactional_id=f"other-{uuid.uuid4().hex}",
        transaction_timeout_ms=600_000,
    )
    await other.start()
    h: HandlerProc | None = None
    try:
        await other.begin_transaction()
        await other.send_offsets_to_transaction({tp: 5}, ts.group)
        h = HandlerProc(ts, tmp_path, "a")
        await _wait_for_log(h, r"metrics on port")
        await asyncio.sleep(6.0)  # assigned, and checked for stale transactions more than once
        assert h.proc.poll() is None and not _ready(h.port), h.log()
        log = _stop_within_grace(h)
        assert "restored at offset" not in log, log[-3000:]
    finally:
        if h is not None:
            h.close()
        with contextlib.suppress(Exception):
            await other.abort_transaction()
        await other.stop()


@pytest.mark.slow
async def test_sigterm_while_consuming_with_the_broker_gone(
    make_topics: MakeTopics, tmp_path: Path, kafka_broker: KafkaBroker
) -> None:
    """The broker dies under a handler busy with a backlog: its transaction in flight
    cannot commit and leaving the group cannot be sent, and SIGTERM must still end it
    within the grace."""
    ts = await make_topics(raw_partitions=1)
    await _fill(ts, 300_000)
    h = HandlerProc(ts, tmp_path, "a")
    try:
        h.wait_ready(120)
        deadline = time.monotonic() + 120
        while h.metric("tickscale_handler_messages_in_total") == 0:
            assert time.monotonic() < deadline, h.log()
            await asyncio.sleep(0.2)
        await kafka_broker.astop(kill=True)
        await asyncio.sleep(1.0)
        _stop_within_grace(h)
    finally:
        h.close()
        await kafka_broker.astart()


# Metrics port ------------------------------------------------------------------------------


@contextlib.contextmanager
def _listening(port: int) -> Iterator[socket.socket | None]:
    """A real listener on ``port`` (all addresses, as the handler binds); None when
    something else already listens there, which keeps it as busy."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("0.0.0.0", port))
    except OSError:
        s.close()
        yield None
        return
    s.listen()
    try:
        yield s
    finally:
        s.close()


def _handler_cmd(ts: TopicSet, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "tickscale", "handler", "--bootstrap", ts.bootstrap,
        "--in", ts.raw, "--out", ts.ticks, "--deadletter", ts.deadletter,
        "--group", ts.group, "--id", "portcheck", *args,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TICKSCALE_HANDLER_")}


def test_a_busy_metrics_port_given_explicitly_is_one_error_line(topics: TopicSet) -> None:
    port = free_port()
    with _listening(port):
        r = subprocess.run(
            _handler_cmd(topics, "--metrics-port", str(port)),
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
        )
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: metrics port {port} is already in use (another handler on this machine?); "
        "choose a free one with --metrics-port N, or --metrics-port 0 for any"
    ], r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_a_metrics_address_not_on_this_machine_is_one_error_line(topics: TopicSet) -> None:
    # 192.0.2.0/24 is reserved for documentation: never one of this machine's addresses.
    r = subprocess.run(
        _handler_cmd(topics, "--metrics-host", "192.0.2.1", "--metrics-port", "0"),
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: --metrics-host 192.0.2.1: cannot listen on 192.0.2.1:0 "
        "(Cannot assign requested address)"
    ], r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_a_busy_default_metrics_port_moves_to_a_free_one(topics: TopicSet, tmp_path: Path) -> None:
    default = HandlerSettings.model_fields["metrics_port"].default
    log_path = tmp_path / "handler.log"
    with _listening(default), log_path.open("wb") as out:
        proc = subprocess.Popen(
            _handler_cmd(topics), stdout=out, stderr=subprocess.STDOUT, env=_env()
        )
        try:
            pattern = rf"default metrics port {default} is in use; serving metrics on port (\d+)"
            deadline = time.monotonic() + 120
            m = None
            while m is None and time.monotonic() < deadline:
                assert proc.poll() is None, log_path.read_text()
                m = re.search(pattern, log_path.read_text())
                time.sleep(0.1)
            assert m is not None, log_path.read_text()
            port = int(m.group(1))
            assert port != default
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                assert r.status == 200
            proc.terminate()
            assert proc.wait(GRACE + EXIT_SLACK_S) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
