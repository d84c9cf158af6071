"""Configuration of one scaler process (environment ``TICKSCALE_SCALER_*``, flags win).

Read once at start-up; anything invalid stops the scaler before it touches a
backend, with the setting's name in the message.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Literal, Self

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.constants import DEADLETTER_TOPIC, HANDLER_GROUP, RAW_TOPIC, TICKS_TOPIC
from core.validation import check_bootstrap, check_redis_url


def _default_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def check_session_min(v: str) -> str:
    """``--session-min`` as the policy reads it (ValueError naming what is wrong); also what
    a load test checks before it hands the value on to its scaler."""
    from scaler.calendar import parse_session_min

    parse_session_min(v)
    return v


def check_guard(v: str) -> str:
    """A rollout guard's ``key=value,...`` (GuardError, a ValueError, naming the key)."""
    from scaler.guard import GuardConfig

    GuardConfig.parse(v)
    return v


class ScalerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TICKSCALE_SCALER_", extra="forbid", populate_by_name=True
    )

    # Where the handlers read and write.
    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="lease, audit, capacity")
    topic: str = Field(RAW_TOPIC, description="raw topic the handlers read")
    out_topic: str = Field(TICKS_TOPIC, description="tick topic the handlers write")
    deadletter_topic: str = Field(DEADLETTER_TOPIC, description="the handlers' dead letters")
    group: str = Field(HANDLER_GROUP, description="the handlers' consumer group")

    # What the handlers are told, when they reach Kafka or Redis by another
    # address than the scaler does (unset: the scaler's own).
    handler_bootstrap: str | None = Field(None, description="Kafka as the handlers reach it")
    handler_redis_url: str | None = Field(None, description="Redis as the handlers reach it")
    # The handlers' passwords, as files under /run/secrets in each handler (named as
    # the handler's settings read them: tickscale_redis_password,
    # tickscale_kafka_password) -> the host file (docker backend, bind-mounted
    # read-only) or the swarm secret (swarm backend). Never copied into an environment.
    # A mapping: set by environment only (JSON), it has no flag.
    handler_secrets: dict[str, str] = Field(default_factory=dict)
    handler_kafka_username: str | None = Field(
        None, description="the handlers' SASL/SCRAM user (unset: PLAINTEXT)"
    )

    # The loop.
    policy: Literal["tickscale", "reactive"] = Field("tickscale", description="scaling policy")
    backend: Literal["docker", "swarm", "process"] = Field(
        "process", description="what runs the handlers"
    )
    poll_s: float = Field(1.0, gt=0, le=60, description="seconds between polls")
    connect_timeout_s: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="at start, wait this long for the broker, Redis and the container "
        "engine, retrying with backoff, then exit naming --bootstrap, --redis-url or "
        "--docker-host",
    )
    dry_run: bool = Field(False, description="decide and log only")
    scaler_id: str = Field(
        default_factory=_default_id, description="this scaler's identity [host-pid]",
        json_schema_extra={"flag": "--id"},
    )  # fmt: skip
    # Several independent fleets may share a Docker engine or Redis: the name
    # labels the containers and keys the lease.
    name: str = Field(
        "default", pattern=r"^[A-Za-z0-9_.-]{1,40}$", description="fleet name (labels, lease)"
    )
    lease_ttl_s: float = Field(5.0, gt=0.5, le=120, description="leader lease, seconds")
    metrics_host: str = Field("0.0.0.0", description="/metrics, /healthz address")
    metrics_port: int = Field(
        9200, ge=0, le=65535,
        validation_alias=AliasChoices(
            "metrics_port", "TICKSCALE_SCALER_METRICS_PORT", "TICKSCALE_METRICS_PORT"
        ),
    )  # fmt: skip

    # Policy.
    min_handlers: int = Field(1, ge=0, description="fewest handlers")
    max_handlers: int = Field(12, ge=1, description="most handlers")
    lag_target_s: float = Field(5.0, gt=0, description="lag to keep below, seconds")
    headroom: float = Field(0.25, ge=0, description="capacity kept above the rate")
    fallback_capacity: float = Field(1000.0, gt=0, description="msgs/s/handler until learned")
    capacity_hold_s: float = Field(
        3600.0, ge=0, description="how long the highest learned capacity stands"
    )
    scale_down_window_s: float = Field(
        120.0, ge=0, description="scale in on the highest need seen this long, seconds"
    )
    scale_down_fraction: float = Field(
        0.5, gt=0, le=1, description="largest share of the fleet removed at once"
    )
    scale_down_interval_s: float = Field(30.0, ge=0, description="seconds between two scale-ins")
    settle_s: float = Field(5.0, ge=0, description="seconds between changes")
    rebalance_pause_s: float = Field(
        4.0, ge=0, description="lag a change is expected to add, seconds"
    )
    # Calendar: an exchange_calendars code, or "none" to scale on lag and rate only.
    calendar: str = Field("XNYS", description="XNYS, XNAS, ... or none")
    session_min: str = Field("", description="e.g. open=8,close=4,midday=1")
    lead_s: float = Field(120.0, ge=0, description="pre-scale this long before a session")
    # Session floors learned from earlier days' rates at the same minute (kept in
    # Redis, scaler.rate_history) replace the static session_min ones once
    # floor_min_days days are known; off, session_min alone.
    learn_floors: bool = Field(True, description="learn session floors from earlier days")
    floor_days: int = Field(20, ge=1, description="earlier days the learned floors remember")
    floor_min_days: int = Field(
        3, ge=1, description="earlier days needed before learned floors replace session_min"
    )
    # "wall": sessions follow the real clock; "replay": they follow the clock the
    # replay feed publishes in Redis, so a day replayed at 60x pre-scales for its
    # own open rather than for today's.
    clock: Literal["wall", "replay"] = Field("wall", description="whose time sessions follow")

    # Backends.
    stop_grace_s: float = Field(30.0, gt=0, description="SIGTERM to SIGKILL")
    # On a clean stop (SIGTERM) the leader drains and removes its handlers, so
    # `compose down` leaves nothing attached to the network. Off by default:
    # a restarted scaler then adopts the running fleet instead.
    stop_handlers_on_exit: bool = Field(
        False, description="drain and remove the handlers when the scaler stops"
    )
    image: str = Field("tickscale:dev", description="docker/swarm: handler image")
    network: str | None = Field(None, description="docker/swarm: network")
    handler_cpus: float | None = Field(1.0, gt=0, description="docker/swarm: CPUs per handler")
    handler_mem_mb: int | None = Field(
        512, gt=0, description="docker/swarm: memory per handler, MB"
    )
    docker_host: str | None = Field(None, description="default: DOCKER_HOST or the local socket")
    swarm_service: str = Field("tickscale-handlers", description="swarm: service name")
    rollout_guard: str = Field(
        "",
        description="rollouts: the guard's thresholds over their defaults "
        "(scaler.guard.GuardConfig), e.g. window_s=60,deadletters_per_1000=0.5; a rollout's "
        "--guard overrides these",
    )
    handler_base_port: int = Field(9300, ge=1024, le=65000, description="process backend")
    state_dir: str = Field(".local/scaler", description="process backend: logs, targets file")
    handler_parent_pid: int | None = Field(
        None,
        gt=0,
        description="process backend: the stack owner the handlers follow (drain and leave "
        "once it is gone); it must be a child subreaper, as `tickscale up`'s is. Unset, "
        "handlers outlive the scaler until a scaler stops them",
    )

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        return check_bootstrap(v)

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, v: str) -> str:
        return check_redis_url(v)

    @field_validator("handler_secrets")
    @classmethod
    def _handler_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        for name, source in v.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or not source:
                raise ValueError(f"{name!r}: expected a file name and its source, got {source!r}")
        return v

    @field_validator("calendar")
    @classmethod
    def _calendar(cls, v: str) -> str:
        if v.lower() == "none":
            return "none"
        from scaler.calendar import CalendarError, check_calendar

        try:
            check_calendar(v)
        except CalendarError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("session_min")
    @classmethod
    def _session_min(cls, v: str) -> str:
        return check_session_min(v)

    @field_validator("rollout_guard")
    @classmethod
    def _guard(cls, v: str) -> str:
        return check_guard(v)

    @model_validator(mode="after")
    def _secrets_on_the_host(self) -> Self:
        # The engine resolves a bind's source, not the scaler's own filesystem.
        relative = [s for s in self.handler_secrets.values() if not s.startswith("/")]
        if self.backend == "docker" and relative:
            raise ValueError(f"handler_secrets: host paths must be absolute, got {relative}")
        return self

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min_handlers > self.max_handlers:
            raise ValueError(
                f"min_handlers ({self.min_handlers}) > max_handlers ({self.max_handlers})"
            )
        return self
