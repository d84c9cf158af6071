"""``tickscale scaler keda``: KEDA's external scaler interface, called as KEDA calls it
(a gRPC client on the generated stubs), against the real broker and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from typer.main import get_command

from core.cli_settings import flag_of, has_flag
from scaler.app import policy_config
from scaler.keda import externalscaler_pb2 as pb
from scaler.keda import externalscaler_pb2_grpc as pb_grpc
from scaler.keda.app import KedaScaler, build_keda
from scaler.keda.grpc_service import METRIC
from scaler.keda.settings import HANDLER_ONLY, KedaSettings
from scaler.policy import Policy
from tickscale.localstack.net import free_port
from tickscale.localstack.topics import TopicSet

ROOT = Path(__file__).resolve().parent.parent
REF = pb.ScaledObjectRef(name="tickscale-handlers", namespace="md")


def _settings(ts: TopicSet, redis_url: str, **kw: Any) -> KedaSettings:
    return KedaSettings(
        bootstrap=ts.bootstrap, redis_url=redis_url, topic=ts.raw, group=ts.group,
        listen="127.0.0.1:0", metrics_host="127.0.0.1", metrics_port=0, calendar="none",
        name=f"keda{os.getpid()}{int(time.time() * 1000) % 10**7}", poll_s=0.3,
        stop_handlers_on_exit=False, **kw,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def _serving(s: KedaSettings) -> AsyncIterator[tuple[KedaScaler, pb_grpc.ExternalScalerStub]]:
    ks = await build_keda(s)
    async with ks:
        task = asyncio.create_task(ks.run())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ks.port}") as ch:
                yield ks, pb_grpc.ExternalScalerStub(ch)
        finally:
            ks.scaler.request_stop()
            await task


async def _produce(ts: TopicSet, n: int, partitions: int) -> None:
    prod = AIOKafkaProducer(bootstrap_servers=ts.bootstrap)
    await prod.start()
    try:
        for i in range(n):
            await prod.send(ts.raw, b"x" * 10, partition=i % partitions)
        await prod.flush()
    finally:
        await prod.stop()


async def _catch_up(ts: TopicSet, partitions: int) -> None:
    """Commit the group at the end of every partition, as handlers that drained it would."""
    c = AIOKafkaConsumer(bootstrap_servers=ts.bootstrap, group_id=ts.group,
                         enable_auto_commit=False)  # fmt: skip
    await c.start()
    try:
        tps = [TopicPartition(ts.raw, p) for p in range(partitions)]
        c.assign(tps)
        ends = await c.end_offsets(tps)
        await c.commit({tp: OffsetAndMetadata(off, "") for tp, off in ends.items()})
    finally:
        await c.stop()


async def _handlers(stub: pb_grpc.ExternalScalerStub) -> float:
    """The HPA's reading: the metric over its target (AverageValue: replicas wanted)."""
    spec = (await stub.GetMetricSpec(REF)).metricSpecs[0]
    resp = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=REF, metricName=METRIC))
    (value,) = resp.metricValues
    assert value.metricName == METRIC and value.metricValue == value.metricValueFloat
    return value.metricValueFloat / spec.targetSizeFloat


async def _polls(ks: KedaScaler, n: int) -> None:
    """Until the scaler has measured ``n`` more times."""
    seen = ks.scaler.snapshot
    for _ in range(n):
        deadline = time.monotonic() + 20
        while ks.scaler.snapshot is seen and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert ks.scaler.snapshot is not seen, "the scaler stopped measuring"
        seen = ks.scaler.snapshot


async def _policy_agrees(ks: KedaScaler, stub: pb_grpc.ExternalScalerStub, lag: int) -> int:
    """Once the server has measured ``lag``: what it reports, checked against a fresh policy
    of the same settings deciding on the server's own snapshot (same lag, rate, capacity)."""
    fresh = Policy(policy_config(ks.settings))
    reported = wanted = -1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        snap = ks.scaler.snapshot
        reported = int(await _handlers(stub))
        if snap is not None and snap is ks.scaler.snapshot and snap.lag_msgs == lag:
            wanted = fresh.decide(snap, time.time(), 0).target
            if reported == wanted:
                return reported
        await asyncio.sleep(0.2)
    raise AssertionError(f"reported {reported} handlers, the policy wants {wanted} at lag {lag}")


@pytest.mark.parametrize("topics", [8], indirect=True)
async def test_keda_gets_the_policys_count_and_activity_from_the_lag(
    topics: TopicSet, redis_url: str
) -> None:
    s = _settings(
        topics, redis_url, min_handlers=1, max_handlers=6, fallback_capacity=100,
        lag_target_s=1, settle_s=0, rebalance_pause_s=0,
    )  # fmt: skip
    async with _serving(s) as (ks, stub):
        spec = await stub.GetMetricSpec(REF)
        assert [(m.metricName, m.targetSize, m.targetSizeFloat) for m in spec.metricSpecs] == [
            (METRIC, 1, 1.0)
        ]
        # No lag: inactive, and the minimum is what the policy wants.
        assert (await stub.IsActive(REF)).result is False
        assert await _handlers(stub) == 1
        stream = stub.StreamIsActive(REF)
        assert (await asyncio.wait_for(stream.read(), 10)).result is False

        # The ingest rate is a moving average from the second poll on: measured before
        # the first burst, it takes that burst as one sample among others, not as the rate.
        await _polls(ks, 2)
        counts = []
        produced = 0
        for n in (120, 200, 600):  # each step below the policy's lag-jump distrust
            await _produce(topics, n, 8)
            produced += n
            # Lag younger than the policy's in-flight floor (1 s) is not backlog yet.
            await asyncio.sleep(1.2)
            counts.append(await _policy_agrees(ks, stub, produced))
            assert (await stub.IsActive(REF)).result is True
            if len(counts) == 1:
                assert (await asyncio.wait_for(stream.read(), 10)).result is True
        # More lag, more handlers, never beyond --max-handlers (8 partitions would take 8).
        assert counts[0] < counts[1] < counts[2] == s.max_handlers, counts

        await _catch_up(topics, 8)
        assert (await asyncio.wait_for(stream.read(), 10)).result is False
        assert (await stub.IsActive(REF)).result is False
        # The policy wants fewer now but holds the count (its scale-in window; here also
        # the members, none, that never matched): KEDA is not told to drop at once.
        await _polls(ks, 1)
        assert await _handlers(stub) == s.max_handlers
        last = ks.scaler.last
        assert last is not None and last.target < s.max_handlers and last.hold, last
        stream.cancel()


async def test_a_restarted_keda_scaler_adopts_the_groups_members(
    topics: TopicSet, redis_url: str
) -> None:
    """Two handlers joined the group: a KEDA scaler starting now reports them, not its
    minimum, so the HPA does not scale a running fleet in behind the policy's back."""
    consumers = [
        AIOKafkaConsumer(topics.raw, bootstrap_servers=topics.bootstrap, group_id=topics.group)
        for _ in range(2)
    ]
    for c in consumers:
        await c.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(c.assignment() for c in consumers):
            await asyncio.gather(*(c.getmany(timeout_ms=200) for c in consumers))
        s = _settings(topics, redis_url, min_handlers=1, max_handlers=4)
        async with _serving(s) as (ks, stub):
            assert await _handlers(stub) == 2
            assert ks.scaler.last is not None and ks.scaler.last.target == 1
    finally:
        for c in consumers:
            await c.stop()


def _keda_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tickscale", "scaler", "keda", *args]


def test_a_bad_listen_address_is_one_line_and_exit_2() -> None:
    for bad in ("9090", "localhost:http", "::1:9090", "0.0.0.0:70000"):
        r = subprocess.run(_keda_cli("--listen", bad), capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
        assert r.stderr.startswith("error: invalid setting --listen: ") and bad in r.stderr
        assert "Traceback" not in r.stderr


def test_a_scaler_flag_before_the_subcommand_is_refused_not_dropped() -> None:
    cmd = [sys.executable, "-m", "tickscale", "scaler", "--max-handlers", "3", "keda"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        "error: --max-handlers goes after the subcommand: tickscale scaler keda --max-handlers ..."
    )


async def test_the_command_serves_kedas_calls_and_stops_on_sigterm(
    topics: TopicSet, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    common = ("--bootstrap", topics.bootstrap, "--redis-url", redis_url, "--topic", topics.raw,
              "--group", topics.group, "--calendar", "none", "--poll", "0.3",
              "--metrics-host", "127.0.0.1")  # fmt: skip
    log = (tmp_path / "keda.log").open("wb")
    proc = subprocess.Popen(
        _keda_cli("--listen", f"127.0.0.1:{port}", "--metrics-port", str(free_port()), *common),
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.ExternalScalerStub(ch)
            resp = await stub.GetMetrics(
                pb.GetMetricsRequest(scaledObjectRef=REF, metricName=METRIC),
                wait_for_ready=True, timeout=60,
            )  # fmt: skip
            assert resp.metricValues[0].metricValue == 1  # the default minimum, no lag
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=REF, metricName="x"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # A second one on the same address: one line naming --listen, exit 2.
        r = await asyncio.to_thread(
            subprocess.run,
            _keda_cli("--listen", f"127.0.0.1:{port}", "--metrics-port", "0", *common),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: invalid setting --listen: cannot listen on"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 30)
        log.close()
    assert rc == 0, (tmp_path / "keda.log").read_text()[-3000:]


def test_the_command_has_the_scalers_policy_flags_and_no_handler_ones() -> None:
    from tickscale.cli import app

    cmd: Any = get_command(app)
    keda = cmd.commands["scaler"].commands["keda"]
    flags = {o for p in keda.params for o in p.opts if o != "--help"}
    fields = KedaSettings.model_fields
    expected = {flag_of(n, f) for n, f in fields.items() if has_flag(f) and n not in HANDLER_ONLY}
    assert flags == expected, flags ^ expected
    assert {"--listen", "--activation-lag", "--max-handlers", "--lag-target"} <= flags
    assert "--backend" not in flags and "--image" not in flags


def _manifests() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            docs[f"{d['kind']}/{d['metadata']['name']}"] = d
    return docs


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_the_k8s_manifests_point_at_each_other() -> None:
    """Not run on a cluster here: this only checks they parse and agree with each other and
    with the command's flags."""
    docs = _manifests()
    so = docs["ScaledObject/tickscale-handlers"]
    trigger = so["spec"]["triggers"][0]
    assert trigger["type"] == "external"
    target = so["spec"]["scaleTargetRef"]["name"]
    handlers = docs[f"Deployment/{target}"]
    keda = docs["Deployment/tickscale-keda"]
    svc = docs["Service/tickscale-keda"]
    host, port = trigger["metadata"]["scalerAddress"].rsplit(":", 1)
    assert host.split(".")[0] == svc["metadata"]["name"]
    grpc_port = next(p for p in svc["spec"]["ports"] if p["port"] == int(port))
    (container,) = keda["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[:2] == ["scaler", "keda"]
    listen_port = int(_arg(args, "--listen").rsplit(":", 1)[1])
    assert grpc_port["targetPort"] in (listen_port, "grpc")
    assert svc["spec"]["selector"].items() <= keda["spec"]["template"]["metadata"]["labels"].items()
    # The HPA's bounds and the policy's agree; one scaler replica (the lease holder decides).
    assert so["spec"]["minReplicaCount"] == int(_arg(args, "--min-handlers"))
    assert so["spec"]["maxReplicaCount"] == int(_arg(args, "--max-handlers"))
    assert keda["spec"]["replicas"] == 1
    (h,) = handlers["spec"]["template"]["spec"]["containers"]
    assert h["args"] == ["handler"]
    env = {e["name"]: e.get("value") for e in h["env"]} | {
        e["name"]: e.get("value") for e in container["env"]
    }
    assert env["TICKSCALE_HANDLER_GROUP"] == env["TICKSCALE_SCALER_GROUP"]
    # Every flag the scaler is given is one the command has.
    cmd_flags = {flag_of(n, f) for n, f in KedaSettings.model_fields.items() if has_flag(f)}
    assert {a for a in args[2:] if a.startswith("--")} <= cmd_flags
