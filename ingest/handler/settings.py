"""Configuration of one feed-handler process (environment ``TICKSCALE_HANDLER_*``)."""

from __future__ import annotations

import os
import socket

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.constants import DEADLETTER_TOPIC, HANDLER_GROUP, RAW_TOPIC, TICKS_TOPIC
from core.validation import check_bootstrap, check_redis_url


def _default_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class HandlerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TICKSCALE_HANDLER_", extra="forbid")

    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    in_topic: str = Field(RAW_TOPIC, description="raw topic", json_schema_extra={"flag": "--in"})
    out_topic: str = Field(
        TICKS_TOPIC, description="tick topic", json_schema_extra={"flag": "--out"}
    )
    deadletter_topic: str = Field(
        DEADLETTER_TOPIC,
        description="dead-letter topic",
        json_schema_extra={"flag": "--deadletter"},
    )
    group: str = Field(HANDLER_GROUP, description="consumer group")
    redis_url: str | None = Field(
        None, description="redis://host:port/db; unset = no Redis",
        json_schema_extra={"flag": "--redis"},
    )  # fmt: skip
    connect_timeout_s: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="at start, wait this long for a broker and the three topics (a restart, "
        "a stack still coming up), retrying with backoff, then exit naming what is missing",
    )
    metrics_host: str = Field("0.0.0.0", description="/metrics, /healthz address")
    metrics_port: int = Field(
        9100,
        ge=0,
        le=65535,
        description="0 = any free port; when left at the default and 9100 is taken, the "
        "handler serves on a free port and logs which",
    )
    handler_id: str = Field(
        default_factory=_default_id, description="handler identity [host-pid]",
        json_schema_extra={"flag": "--id"},
    )  # fmt: skip
    version: str = Field(
        "", description="the version the scaler started it as (a rollout's canary or fleet)"
    )
    eos: bool = Field(True, description="exactly-once transactions; off = at-least-once")
    max_batch: int = Field(2000, ge=1, le=100_000, description="raw messages per transaction")
    poll_timeout_ms: int = Field(20, ge=1, le=10_000, description="longest wait of one poll")
    fetch_topup_ms: int = Field(
        10,
        ge=0,
        le=1_000,
        description="after each poll, wait this long at most for the fetch it started (0 = off)",
    )
    snapshot_interval_s: float = Field(5.0, gt=0, description="seconds between book snapshots")
    parent_pid: int | None = Field(
        None,
        gt=0,
        description="drain and exit once this process is no longer the parent: the stack "
        "owner (a child subreaper such as `tickscale up`'s), passed on by the process "
        "backend when it has one. Never the scaler's pid: handlers outlive a dead scaler "
        "and its successor adopts them",
    )
    session_timeout_ms: int = Field(10_000, ge=1000, description="the group's session timeout")
    transaction_timeout_ms: int = Field(
        60_000,
        ge=1000,
        le=900_000,
        description="the broker aborts a transaction left open this long (a handler killed "
        "mid-commit); at most the broker's transaction.max.timeout.ms",
    )
    fence_after_s: float = Field(
        2.0,
        gt=0,
        description="a partition's new owner waits this long for an open transaction holding "
        "its offset, then fences the group's handlers holding one outside the group (and "
        "checks again as often)",
    )
    heartbeat_interval_ms: int = Field(1_000, ge=100, description="group heartbeat interval")
    stop_grace_s: float = Field(
        20.0,
        gt=0,
        le=600,
        description="a stop (SIGTERM) ends the handler within this long, whatever it is doing: "
        "the batch in flight commits or is aborted; keep it below the supervisor's SIGTERM "
        "to SIGKILL time (the scaler's stop grace, 30 s by default)",
    )
    poison_after: int = Field(
        3,
        ge=1,
        le=100,
        description="a partition whose batch fails to commit this many times in a row at one "
        "offset is committed one record at a time from there, and a record failing this many "
        "times in a row alone is dead-lettered (repeated_failure)",
    )
    retry_backoff_max_s: float = Field(
        5.0, gt=0, le=300, description="longest wait between repeated failed batches"
    )

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        return check_bootstrap(v)

    @field_validator("redis_url")
    @classmethod
    def _redis(cls, v: str | None) -> str | None:
        return check_redis_url(v) if v else None
