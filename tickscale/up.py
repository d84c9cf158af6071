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
import signal
import subprocess
import sys
import time

import redis
from aiokafka.errors import NonEmptyGroup
from rich.console import Console

from core import constants as c
from core.runtime import TERMINATION_SIGNALS, sigterm_and_sighup_as_ctrl_c
from core.topology import create_topics
from ingest.codecs.errors import SourceError
from ingest.manifest import Manifest
from ingest.replay.run import run_replay
from ingest.replay.settings import ReplaySettings
from ingest.verify import run_verify
from tickscale.localstack import KafkaBroker, RedisServer, delete_groups, delete_topics
from tickscale.localstack.net import port_open
from tickscale.localstack.proc import spawn, stop
from tickscale.up_settings import UpSettings

console = Console(stderr=True)


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


class _Stack:
    """What ``up`` starts (a broker, Redis, the scaler under its keeper) and stops, in
    reverse order, the scaler first so its handlers drain and commit."""

    def __init__(self, s: UpSettings) -> None:
        self.s = s
        self.log_dir = s.state_dir / "logs"
        self.bootstrap = f"127.0.0.1:{s.kafka_port}"
        self.redis_url = f"redis://127.0.0.1:{s.redis_port}/0"
        self.broker: KafkaBroker | None = None
        self.redis: RedisServer | None = None
        self.scaler: subprocess.Popen[bytes] | None = None

    def start_services(self) -> None:
        s = self.s
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not s.reset:
            _refuse_foreign(s.kafka_port, s.redis_port)
        if port_open("127.0.0.1", s.kafka_port):
            console.print(
                f"reusing the Kafka broker already on {self.bootstrap} (--reset: its md.* "
                f"topics and consumer group {c.HANDLER_GROUP} are deleted)"
            )
        else:
            console.print(f"starting Kafka on {self.bootstrap} (data in {s.state_dir / 'kafka'})")
            self.broker = KafkaBroker(s.state_dir / "kafka", port=s.kafka_port).start()
        if port_open("127.0.0.1", s.redis_port):
            console.print(
                f"reusing Redis on {self.redis_url} (--reset: its book snapshots are deleted)"
            )
        else:
            self.redis = RedisServer(port=s.redis_port, work_dir=s.state_dir / "redis").start()
            console.print(f"started Redis on {self.redis_url}")

    def start_scaler(self) -> None:
        """The scaler and its process backend run the handlers, also a fixed fleet (its
        minimum and maximum equal, no calendar)."""
        s = self.s
        lo = s.handlers
        hi = max(s.max_handlers, lo) if s.scaler else lo
        # The replayed day's sessions, not today's; the busy sessions get the whole fleet
        # ahead of time.
        sessions = ["--clock", "replay", "--session-min", f"open={hi},close={hi}", "--lead", "5"]
        cmd = [
            sys.executable, "-m", "tickscale.keeper",
            sys.executable, "-m", "tickscale", "scaler", "--backend", "process",
            "--bootstrap", self.bootstrap, "--redis-url", self.redis_url,
            "--min-handlers", str(lo), "--max-handlers", str(hi),
            *(sessions if s.scaler else ["--calendar", "none"]), "--scale-down-window", "30",
            "--metrics-port", str(s.scaler_port), "--handler-base-port", str(s.metrics_port),
            "--state-dir", str(s.state_dir / "scaler"),
        ]  # fmt: skip
        # The keeper's SIGTERM (also sent if `up` is killed) makes the scaler drain and stop
        # its handlers before both exit.
        self.scaler = spawn(cmd, self.log_dir / "scaler.log")
        fleet = f"{lo}-{hi} handlers" if s.scaler else f"a fixed fleet of {lo} handlers"
        console.print(
            f"scaler started ({fleet}, metrics on :{s.scaler_port}, handler logs in "
            f"{s.state_dir / 'scaler' / 'logs'}, audit in Redis)"
        )

    def stop(self) -> None:
        if self.scaler is not None:
            stop(self.scaler, timeout=120)
        if self.redis is not None:
            self.redis.stop()
        if self.broker is not None:
            self.broker.stop()


def _replay_and_verify(stack: _Stack, replay: ReplaySettings) -> int:
    completed = run_replay(replay)
    sigterm_and_sighup_as_ctrl_c()  # the replay's event loop reset them when it closed
    if not completed:
        console.print("replay interrupted; stopping handlers and services")
        return 130
    console.print("replay done; waiting for the handlers to drain and verifying")
    m = Manifest.read(replay.manifest)
    res = run_verify(stack.bootstrap, c.TICKS_TOPIC, m, c.DEADLETTER_TOPIC, timeout_s=300)
    # One unwrapped line: scripts grep for the ledger summary.
    console.print(
        f"ticks={res.ticks_read:,} expected={res.ticks_expected:,} {res.summary_line()}",
        soft_wrap=True,
    )
    return 0 if res.ok else 1


def run_up(s: UpSettings) -> int:
    """The longer day (``up --full-day``); the exit code."""
    stack = _Stack(s)
    replay = ReplaySettings(
        manifest=s.state_dir / f"manifest-{int(time.time())}.json",
        bootstrap=stack.bootstrap, symbols=s.symbols, seed=s.seed, day=s.day, start=s.start,
        end=s.end, speed=s.speed, redis_url=stack.redis_url,
    )  # fmt: skip
    sigterm_and_sighup_as_ctrl_c()
    try:
        replay.spec().build()  # a wrong --date or --from fails here, before anything starts
    except SourceError as e:
        console.print(f"[red]error:[/] {e.where}: {e.what}", soft_wrap=True)
        return 2
    try:
        stack.start_services()
        _reset_day(stack.bootstrap, stack.redis_url, s.partitions)
        stack.start_scaler()
        return _replay_and_verify(stack, replay)
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
            stack.stop()
