"""Where a load test runs: Kafka and Redis (started or reused), its topics, its scaler.

Targets:

- ``local`` (default): a Kafka broker and a Redis server of its own on free loopback ports,
  started like ``tickscale up`` starts them, or the ones given by ``--bootstrap``/``--redis``;
- ``compose``: the compose stack's Kafka on ``127.0.0.1:${KAFKA_EXTERNAL_PORT}`` (29092) and its
  Redis with the password of ``compose/.env``. Redis is not published on the host, so it is
  reached at its container's address on the stack's network (looked up through Docker), unless
  ``--redis`` says otherwise.

Every run gets its own topics, consumer group and scaler name (``lt-<time>-<random>``), so
it starts with an empty ledger and never touches another fleet's data, including the compose
stack's own day on ``md.raw``. The fleet under test is always the load test's own scaler with
the process backend: handlers are child processes of the scaler, which the chaos drills need
(a SIGKILL is a real crash) and which work against any of the targets.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from core.cli_settings import to_args
from core.secrets import client_secrets
from tickscale.localstack.net import HOST, free_port, port_open
from tickscale.localstack.redis import RedisServer

if TYPE_CHECKING:
    from scaler.settings import ScalerSettings
    from tickscale.localstack.kafka import KafkaBroker


class Restartable(Protocol):
    """A service a chaos drill may stop, kill and start again."""

    def stop(self) -> object: ...

    def start(self) -> object: ...

    def kill(self) -> None: ...

    @property
    def pid(self) -> int | None: ...


@dataclass(frozen=True)
class RunNames:
    run_id: str

    @property
    def raw(self) -> str:
        return f"{self.run_id}.md.raw"

    @property
    def ticks(self) -> str:
        return f"{self.run_id}.md.ticks"

    @property
    def deadletter(self) -> str:
        return f"{self.run_id}.md.deadletter"

    @property
    def group(self) -> str:
        return f"{self.run_id}.feed-handlers"

    @property
    def audit_stream(self) -> str:
        from core.constants import REDIS_SCALER_EVENTS

        return f"{REDIS_SCALER_EVENTS}:{self.run_id}"


def new_run_id() -> str:
    # The scaler's fleet name allows 40 characters; this is 24.
    return f"lt-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose ``.env`` file (comments and blanks skipped)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, _, v = line.partition("=")
        out[k.strip()] = v.strip().strip("'\"")
    return out


def compose_bootstrap(env_file: Path) -> str:
    """The compose stack's Kafka as published on the host."""
    if not env_file.exists():
        raise RuntimeError(f"{env_file} not found: copy compose/.env.example to it (see README)")
    return f"127.0.0.1:{read_env_file(env_file).get('KAFKA_EXTERNAL_PORT', '29092')}"


def compose_redis_url(env_file: Path) -> str:
    """The compose stack's Redis: its container's address on the stack's network."""
    if not env_file.exists():
        raise RuntimeError(f"{env_file} not found: copy compose/.env.example to it (see README)")
    env = read_env_file(env_file)
    # The stack's password file (SECRETS_DIR, docs/security.md); the URL stays on this host.
    pw_file = Path(env.get("SECRETS_DIR", "")) / "redis_password"
    password = pw_file.read_text().strip() if env.get("SECRETS_DIR") and pw_file.exists() else ""
    ip = _compose_redis_ip(env.get("COMPOSE_PROJECT_NAME", "tickscale"))
    auth = f":{password}@" if password else ""
    return f"redis://{auth}{ip}:6379/0"


def use_compose_principal(env_file: Path, work_dir: Path) -> bool:
    """Run this load test's Kafka clients (and its children's) as the stack's User:loadtest.

    A load test on the compose stack makes topics, a group and handlers of its own, all named
    after the run (``lt-...``): User:loadtest may make, use and delete exactly those, and read
    the stack's topics (compose/kafka/acls.txt). Its password file, from the stack's
    SECRETS_DIR, is copied into a private folder as this process's secret file. False when
    the stack has no such file."""
    env = read_env_file(env_file)
    source = Path(env.get("SECRETS_DIR") or "/nonexistent") / "kafka_loadtest_password"
    if not source.is_file():
        return False
    folder = work_dir / "secrets"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = folder / "tickscale_kafka_password"
    target.write_text(source.read_text())
    target.chmod(0o400)
    os.environ["TICKSCALE_SECRETS_DIR"] = str(folder)
    os.environ["TICKSCALE_KAFKA_USERNAME"] = "loadtest"
    client_secrets.cache_clear()
    return True


def _compose_container(project: str, service: str) -> object:
    from docker.client import from_env

    client = from_env()
    found = client.containers.list(
        filters={
            "label": [
                f"com.docker.compose.project={project}",
                f"com.docker.compose.service={service}",
            ]
        }
    )
    if not found:
        raise RuntimeError(f"no running {service} container of compose project {project!r}")
    return found[0]


def _compose_redis_ip(project: str) -> str:
    try:
        c = _compose_container(project, "redis")
    except Exception as e:  # the Docker SDK raises its own and requests' errors
        raise RuntimeError(f"cannot find the compose stack's Redis ({e}); pass --redis") from e
    networks = c.attrs["NetworkSettings"]["Networks"]  # type: ignore[attr-defined]
    for net in networks.values():
        if net.get("IPAddress"):
            return str(net["IPAddress"])
    raise RuntimeError("the compose Redis container has no IP address; pass --redis")


class ComposeService:
    """A compose service's container, stopped, killed and started through Docker (Redis drills)."""

    def __init__(self, project: str, service: str) -> None:
        self.container = _compose_container(project, service)

    def stop(self) -> None:
        self.container.stop(timeout=10)  # type: ignore[attr-defined]

    def kill(self) -> None:
        self.container.kill()  # type: ignore[attr-defined]

    def start(self) -> object:
        self.container.start()  # type: ignore[attr-defined]
        return self

    @property
    def pid(self) -> int | None:
        self.container.reload()  # type: ignore[attr-defined]
        pid = self.container.attrs["State"].get("Pid")  # type: ignore[attr-defined]
        return int(pid) if pid else None


class LocalRedis(RedisServer):
    """The run's own redis-server, which the redis-kill drill may also crash (``kill``)."""


def free_port_block(n: int, lo: int = 20000, hi: int = 60000) -> int:
    """A base port with ``n`` consecutive free ports (the process backend's handler slots)."""
    for _ in range(200):
        base = lo + secrets.randbelow(hi - lo - n)
        ok = True
        for p in range(base, base + n):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((HOST, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no {n} consecutive free ports between {lo} and {hi}")


@dataclass
class Services:
    """Kafka and Redis for one run; ``broker``/``redis`` are set only for what it owns."""

    bootstrap: str
    redis_url: str
    target: str
    broker: KafkaBroker | None = None  # when started here
    redis: Restartable | None = None  # RedisServer, or a compose container
    owns_broker: bool = False
    owns_redis: bool = False
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(
        cls,
        target: str,
        bootstrap: str | None,
        redis_url: str | None,
        work_dir: Path,
        compose_env: Path,
    ) -> Services:
        from tickscale.localstack import KafkaBroker

        if target == "compose":
            svc = cls(
                bootstrap or compose_bootstrap(compose_env),
                redis_url or compose_redis_url(compose_env),
                target,
            )
            env = read_env_file(compose_env) if compose_env.exists() else {}
            if bootstrap is None and use_compose_principal(compose_env, work_dir):
                svc.notes.append("Kafka as the stack's loadtest principal (SASL/SCRAM)")
            if redis_url is None:
                with contextlib.suppress(RuntimeError):
                    svc.redis = ComposeService(
                        env.get("COMPOSE_PROJECT_NAME", "tickscale"), "redis"
                    )
            host, _, port = svc.bootstrap.rpartition(":")
            if not port_open(host, int(port)):
                raise RuntimeError(f"the compose stack's Kafka is not listening on {svc.bootstrap}")
            return svc
        if target != "local":
            raise RuntimeError(f"--target: expected local or compose, got {target!r}")
        svc = cls(bootstrap or "", redis_url or "", target)
        try:
            if bootstrap is None:
                broker = KafkaBroker(work_dir / "kafka")
                broker.start()
                svc.broker, svc.owns_broker, svc.bootstrap = broker, True, broker.bootstrap
                svc.notes.append(f"started Kafka on {broker.bootstrap}")
            if redis_url is None:
                rs = LocalRedis(port=free_port(), work_dir=work_dir / "redis")
                rs.start()
                svc.redis, svc.owns_redis, svc.redis_url = rs, True, rs.url
                svc.notes.append(f"started Redis on {rs.url}")
        except BaseException:
            svc.close()
            raise
        return svc

    def close(self) -> None:
        if self.owns_redis and self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
        if self.owns_broker and self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.stop()
            # The day's data is the run's only big output; the broker's log stays.
            shutil.rmtree(self.broker.log_dir, ignore_errors=True)


class ScalerChild:
    """The run's scaler (process backend) as a child process; SIGTERM drains its handlers.

    ``kill()`` then ``start()`` is the kill-scaler drill: the same command, state directory
    and ports again, as a supervisor would restart it.
    """

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.cmd = cmd
        self.env = env
        self.log = log
        self.restarts = 0
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as f:
            return subprocess.Popen(
                self.cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env,
                # Its own session: a Ctrl-C on the terminal reaches the load test, which then
                # stops the scaler in order (handlers drain first).
                start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc.poll() is None else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL to the scaler alone: its handlers are in their own sessions, untouched."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def start(self) -> ScalerChild:
        if self.proc.poll() is not None:
            self.proc = self._spawn()
            self.restarts += 1
        return self

    def stop(self, timeout: float = 90.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def scaler_command(names: RunNames, settings: ScalerSettings) -> list[str]:
    """The run's scaler: ``settings`` on the run's own topics, group and fleet name."""
    own = settings.model_copy(
        update={
            "topic": names.raw, "out_topic": names.ticks, "deadletter_topic": names.deadletter,
            "group": names.group, "name": names.run_id,
        }
    )  # fmt: skip
    own.model_fields_set.update(("topic", "out_topic", "deadletter_topic", "group", "name"))
    return [sys.executable, "-m", "tickscale.loadtest.scaler_proc", *to_args(own)]
