"""``tickscale up``: the whole pipeline on one machine, no Docker.

Starts a Kafka broker and Redis on loopback, recreates the topics and drops
the handlers' consumer group and book snapshots so the day's ledger starts
clean, starts the scaler (which runs the feed handlers), replays a synthetic
day, then verifies every tick against the manifest. A broker or Redis already
listening on the port is someone else's: its data is reset only with
``--reset``. Ctrl-C stops the replay and then everything this command started,
in order, handlers first so they commit.

The scaler runs under ``tickscale.keeper``, the stack owner its handlers
follow: a scaler that dies is started again and adopts the running handlers,
and if ``up`` dies the keeper is sent SIGTERM by the kernel and the stack
drains and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from aiokafka.errors import NonEmptyGroup
from rich.console import Console

from core import constants as c
from core.runtime import TERMINATION_SIGNALS, sigterm_and_sighup_as_ctrl_c
from core.topology import create_topics
from ingest.codecs.errors import SourceError
from ingest.manifest import Manifest
from ingest.replay.run import run_replay
from ingest.replay.spec import SourceSpec
from ingest.verify import run_verify
from tickscale.localstack import KafkaBroker, RedisServer, delete_groups, delete_topics
from tickscale.localstack.net import port_open
from tickscale.localstack.proc import spawn, stop

console = Console(stderr=True)


class HandlerFleet:
    """Feed handlers as child processes, stopped with SIGTERM so they drain."""

    def __init__(self, bootstrap: str, redis_url: str, log_dir: Path, base_port: int) -> None:
        self.bootstrap = bootstrap
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.base_port = base_port
        self.procs: list[subprocess.Popen[bytes]] = []

    def add(self) -> None:
        i = len(self.procs)
        log = (self.log_dir / f"handler-{i}.log").open("wb")
        cmd = [
            sys.executable, "-m", "tickscale", "handler", "--bootstrap", self.bootstrap,
            "--redis", self.redis_url, "--metrics-port", str(self.base_port + i),
            "--id", f"handler-{i}",
        ]  # fmt: skip
        # Handlers drain and leave by themselves if this process dies unannounced.
        env = os.environ | {"TICKSCALE_HANDLER_PARENT_PID": str(os.getpid())}
        self.procs.append(
            subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        )

    def stop(self, timeout: float = 60) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class ForeignService(Exception):
    """Something ``up`` did not start listens where it would reset data."""


def _refuse_foreign(kafka_port: int, redis_port: int) -> None:
    """Raise ForeignService naming the first service already listening (nothing is deleted)."""
    if port_open("127.0.0.1", kafka_port):
        raise ForeignService(
            f"a broker already listens on 127.0.0.1:{kafka_port} and up did not start it; "
            "pass --reset to delete its md.* topics and the handlers' consumer group, "
            "or stop it"
        )
    if port_open("127.0.0.1", redis_port):
        raise ForeignService(
            f"Redis already listens on 127.0.0.1:{redis_port} and up did not start it; "
            "pass --reset to delete its book snapshots, or stop it"
        )


def _reset_day(bootstrap: str, redis_url: str, partitions: int) -> None:
    """Fresh topics, no committed offsets and no stale snapshots: a new day's ledger must
    start empty. The group goes first: it fails while handlers still use it, and then
    nothing has been deleted yet."""
    try:
        asyncio.run(delete_groups(bootstrap, [c.HANDLER_GROUP]))
    except NonEmptyGroup:
        raise ForeignService(
            f"consumer group {c.HANDLER_GROUP} on {bootstrap} still has members: stop the "
            "handlers that use this broker, then run up again"
        ) from None
    asyncio.run(delete_topics(bootstrap, [c.RAW_TOPIC, c.TICKS_TOPIC, c.DEADLETTER_TOPIC]))
    r = redis.Redis.from_url(redis_url)
    try:
        keys = list(r.scan_iter(c.REDIS_BOOK_SNAPSHOT + "*"))
        if keys:
            r.delete(*keys)
    finally:
        r.close()
    asyncio.run(create_topics(bootstrap, partitions, partitions))


def run_up(
    *,
    symbols: int,
    speed: float | None,
    handlers: int,
    seed: int,
    day: str | None,
    start: str | None,
    end: str | None,
    partitions: int,
    kafka_port: int,
    redis_port: int,
    state_dir: Path,
    metrics_base_port: int = 9100,
    scaler: bool = True,
    max_handlers: int = 4,
    scaler_port: int = 9200,
    reset: bool = False,
) -> int:
    """
    :param reset: reset (topics, consumer group, snapshots) a broker or Redis that
        already listens on its port instead of refusing to touch it
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    log_dir = state_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    broker: KafkaBroker | None = None
    redis_srv: RedisServer | None = None
    fleet: HandlerFleet | None = None
    scaler_child: subprocess.Popen[bytes] | None = None
    sigterm_and_sighup_as_ctrl_c()
    spec = SourceSpec("synthetic", symbols, seed, day=day, start=start, end=end)
    try:
        spec.build()  # a wrong --date or --from fails here, before anything starts
    except SourceError as e:
        console.print(f"[red]error:[/] {e.where}: {e.what}", soft_wrap=True)
        return 2
    try:
        if not reset:
            _refuse_foreign(kafka_port, redis_port)
        bootstrap = f"127.0.0.1:{kafka_port}"
        if port_open("127.0.0.1", kafka_port):
            console.print(
                f"reusing the Kafka broker already on {bootstrap} (--reset: its md.* topics "
                f"and consumer group {c.HANDLER_GROUP} are deleted)"
            )
        else:
            console.print(f"starting Kafka on {bootstrap} (data in {state_dir / 'kafka'})")
            broker = KafkaBroker(state_dir / "kafka", port=kafka_port).start()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        if port_open("127.0.0.1", redis_port):
            console.print(f"reusing Redis on {redis_url} (--reset: its book snapshots are deleted)")
        else:
            redis_srv = RedisServer(port=redis_port, work_dir=state_dir / "redis").start()
            console.print(f"started Redis on {redis_url}")

        _reset_day(bootstrap, redis_url, partitions)
        if scaler:
            hi = max(max_handlers, handlers)
            cmd = [
                sys.executable, "-m", "tickscale.keeper",
                sys.executable, "-m", "tickscale", "scaler", "--backend", "process",
                "--bootstrap", bootstrap, "--redis-url", redis_url,
                "--min-handlers", str(handlers), "--max-handlers", str(hi),
                # The replayed day's sessions, not today's; the busy sessions get
                # the whole fleet ahead of time.
                "--clock", "replay", "--session-min", f"open={hi},close={hi}",
                "--lead", "5", "--scale-down-window", "30",
                "--metrics-port", str(scaler_port), "--handler-base-port", str(metrics_base_port),
                "--state-dir", str(state_dir / "scaler"),
            ]  # fmt: skip
            # The keeper's SIGTERM (also sent if `up` is killed) makes the scaler
            # drain and stop its handlers before both exit.
            scaler_child = spawn(cmd, log_dir / "scaler.log")
            console.print(
                f"scaler started ({handlers}-{hi} handlers, metrics on :{scaler_port}, "
                f"handler logs in {state_dir / 'scaler' / 'logs'}, audit in Redis)"
            )
        else:
            fleet = HandlerFleet(bootstrap, redis_url, log_dir, metrics_base_port)
            for _ in range(handlers):
                fleet.add()
            console.print(
                f"{handlers} handlers started (metrics on ports {metrics_base_port}-"
                f"{metrics_base_port + handlers - 1}, logs in {log_dir})"
            )
        manifest = state_dir / f"manifest-{int(time.time())}.json"
        completed = run_replay(
            spec, manifest=manifest, bootstrap=bootstrap, topic=c.RAW_TOPIC, speed=speed,
            progress=True, redis_url=redis_url,
        )  # fmt: skip
        sigterm_and_sighup_as_ctrl_c()  # the replay's event loop reset them when it closed
        if not completed:
            console.print("replay interrupted; stopping handlers and services")
            return 130
        console.print("replay done; waiting for the handlers to drain and verifying")
        m = Manifest.read(manifest)
        res = run_verify(bootstrap, c.TICKS_TOPIC, m, c.DEADLETTER_TOPIC, timeout_s=300)
        # One unwrapped line: scripts grep for the ledger summary.
        console.print(
            f"ticks={res.ticks_read:,} expected={res.ticks_expected:,} {res.summary_line()}",
            soft_wrap=True,
        )
        return 0 if res.ok else 1
    except KeyboardInterrupt:
        console.print("interrupted; stopping")
        return 130
    except ForeignService as e:
        console.print(f"[red]error:[/] {e}", soft_wrap=True)
        return 2
    except (RuntimeError, TimeoutError, OSError) as e:
        # Start-up failures (port taken, broker not ready) are user-facing, not bugs.
        console.print(f"[red]error:[/] {e}")
        return 1
    finally:
        # A second SIGTERM or SIGHUP must not cut the shutdown short; a second
        # Ctrl-C still does.
        for sig in TERMINATION_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        with contextlib.suppress(KeyboardInterrupt):
            if scaler_child is not None:
                stop(scaler_child, timeout=120)
            if fleet is not None:
                fleet.stop()
            if redis_srv is not None:
                redis_srv.stop()
            if broker is not None:
                broker.stop()
