"""Configuration of one ``tickscale loadtest`` run (environment ``TICKSCALE_LOADTEST_*``,
flags win). The run's internal description, :class:`~tickscale.loadtest.runner.LoadTestConfig`,
takes its defaults from here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.validation import check_out_dir, check_out_file
from scaler.settings import check_guard, check_session_min
from tickscale.loadtest.scenarios import PlanOptions
from tickscale.loadtest.slo import Thresholds

_OFF = " (0 = off)"


class LoadTestSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TICKSCALE_LOADTEST_", extra="forbid")

    scenario: str = Field("open", description="full-day | open | close | flash-burst | after-hours")
    target: Literal["local", "compose"] = Field("local", description="where the stack runs")
    bootstrap: str | None = Field(
        None, description="Kafka HOST:PORT to use (default: start one / compose's)"
    )
    redis_url: str | None = Field(
        None, description="Redis URL to use (default: start one / compose's)",
        json_schema_extra={"flag": "--redis"},
    )  # fmt: skip
    compose_env: Path = Field(Path("compose/.env"), description="compose .env (target compose)")

    # The replayed day (see PlanOptions).
    source: str = Field(PlanOptions.source, description="synthetic | itch | jsonl")
    file: Path | None = Field(None, description="input file for itch/jsonl")
    symbols: int | None = Field(
        None, ge=1, description="synthetic: instruments (default: the scenario's)"
    )
    only: str | None = Field(
        None,
        description="only these symbols, comma-separated (any source; market-wide kept); "
        "with --suite: only these cases",
    )
    seed: int = Field(PlanOptions.seed, description="synthetic: the day's seed")
    day: str | None = Field(
        None, description="trading date YYYY-MM-DD", json_schema_extra={"flag": "--date"}
    )
    start: str | None = Field(
        None, description="start HH:MM (exchange time)", json_schema_extra={"flag": "--from"}
    )
    end: str | None = Field(
        None, description="end HH:MM (exchange time)", json_schema_extra={"flag": "--to"}
    )
    speed: str | None = Field(
        None, description="replay speed: number or max (default: the scenario's)"
    )
    burst_at: str = Field(PlanOptions.burst_at, description="flash-burst: when it starts")
    burst_multiple: float = Field(
        PlanOptions.burst_multiple,
        description="flash-burst: multiple of the base speed (peak rate)",
    )
    burst_seconds: float = Field(PlanOptions.burst_seconds, description="flash-burst: wall seconds")
    malformed_every: int = Field(
        PlanOptions.malformed_every, ge=0, description="inject a malformed message after every N"
    )

    # The fleet and its scaler.
    partitions: int = Field(6, ge=1, description="partitions of the run's topics")
    policy: str = Field("tickscale", description="tickscale | reactive | fixed:N")
    min_handlers: int = Field(1, ge=0, description="the scaler's minimum")
    max_handlers: int = Field(4, ge=1, description="the scaler's maximum")
    session_min: str = Field("open=4,close=3", description="tickscale policy: per-session floor")
    lead_s: float = Field(5.0, ge=0, description="tickscale policy: pre-scale lead, wall s")
    lag_target_s: float = Field(5.0, gt=0, description="the scaler's lag target, s")
    scale_down_window_s: float = Field(30.0, ge=0, description="the scaler's scale-down window, s")
    chaos: list[str] = Field(
        default_factory=list,
        description="KIND@SECONDS[:DURATION], repeatable; kill-handler, scale-in, kill-scaler, "
        "broker-restart, broker-kill, broker-pause, redis-stop, redis-kill (duration "
        "default 60 for broker-restart and redis-stop, 10 for the others)",
    )
    rollout: str | None = Field(
        None,
        description="VERSION@SECONDS: a handler rollout then (local: a command line; compose: "
        "an image the gate admits); see docs/rollout.md",
    )
    rollout_guard: str = Field("", description="--rollout's guard, key=value,...")

    # Verdicts.
    slo_p50: float = Field(Thresholds.latency_p50_s, description="latency p50 limit, s" + _OFF)
    slo_p99: float = Field(Thresholds.latency_p99_s, description="latency p99 limit, s" + _OFF)
    slo_max: float = Field(Thresholds.latency_max_s, description="latency max limit, s" + _OFF)
    slo_lag_p99: float = Field(Thresholds.lag_p99_s, description="lag p99 limit, s" + _OFF)
    slo_lag_max: float = Field(Thresholds.lag_max_s, description="lag max limit, s" + _OFF)
    slo_recovery: float = Field(Thresholds.recovery_s, description="recovery limit, s" + _OFF)

    # The run itself.
    out: Path | None = Field(None, description="output directory (default .local/loadtest/{run})")
    json_out: Path | None = Field(
        None, description="write results here", json_schema_extra={"flag": "--json"}
    )
    drain_timeout_s: float = Field(300.0, gt=0, description="wait for the group to drain, s")
    connect_timeout_s: float = Field(
        120.0, gt=0, le=3600,
        description="wait this long for the --bootstrap broker, retrying with backoff, then "
        "exit naming it",
    )  # fmt: skip
    progress: bool = Field(True, description="live progress")
    keep_topics: bool = Field(False, description="keep the run's topics")
    no_members_timeout_s: float = Field(
        30.0, ge=0, description="stop the run when the group has no members this long, s" + _OFF
    )
    suite: str | None = Field(
        None, description="run a suite instead (reliability: every drill and bad input)"
    )

    @field_validator("out")
    @classmethod
    def _out(cls, v: Path | None) -> Path | None:
        return check_out_dir(v)

    @field_validator("json_out")
    @classmethod
    def _json_out(cls, v: Path | None) -> Path | None:
        return check_out_file(v)

    @field_validator("compose_env")
    @classmethod
    def _compose_env(cls, v: Path, info: ValidationInfo) -> Path:
        # Where the compose stack publishes its broker and Redis, unless both are given
        # (the fields before this one).
        d = info.data
        needed = d.get("bootstrap") is None or d.get("redis_url") is None
        if d.get("target") == "compose" and needed and not v.is_file():
            raise ValueError(f"{v} not found: copy compose/.env.example to it (see README)")
        return v

    # What the run hands to its scaler, checked as the scaler checks it: a mistake here
    # would otherwise surface only once the stack is up, in the scaler's own log.
    @field_validator("session_min")
    @classmethod
    def _session_min(cls, v: str) -> str:
        return check_session_min(v)

    @field_validator("rollout_guard")
    @classmethod
    def _guard(cls, v: str) -> str:
        return check_guard(v)

    def plan_options(self) -> PlanOptions:
        return PlanOptions(
            source=self.source, file=self.file, symbols=self.symbols, seed=self.seed,
            date=self.day, start=self.start, end=self.end, speed=self.speed,
            burst_at=self.burst_at, burst_multiple=self.burst_multiple,
            burst_seconds=self.burst_seconds, malformed_every=self.malformed_every,
            only=self.only,
        )  # fmt: skip

    def thresholds(self) -> Thresholds:
        return Thresholds(
            self.slo_p50, self.slo_p99, self.slo_max, self.slo_lag_p99, self.slo_lag_max,
            self.slo_recovery,
        )  # fmt: skip


def default(name: str) -> Any:
    """A setting's declared default (for the run's internal description)."""
    return LoadTestSettings.model_fields[name].default
