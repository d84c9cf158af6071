"""Configuration of ``tickscale scaler simulate`` (environment ``TICKSCALE_SIMULATE_*``, flags
win)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.validation import check_out_file


class SimulateSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TICKSCALE_SIMULATE_", extra="forbid")

    # The day.
    source: Literal["synthetic", "trace"] = Field("synthetic", description="the day's rates")
    seed: int = Field(1, description="synthetic: the day's seed")
    symbols: int = Field(500, ge=1, description="synthetic: instruments")
    trace: Path | None = Field(None, description="trace: CSV of time, msgs/s")
    day: str | None = Field(
        None, description="YYYY-MM-DD (default: a session)", json_schema_extra={"flag": "--date"}
    )

    # The fleet and the policy.
    capacity: float = Field(2500.0, gt=0, description="msgs/s one handler sustains")
    capacity_error: float = Field(
        0.0, ge=-0.9, le=3.0, description="configured capacity off by this share, e.g. 0.3"
    )
    partitions: int = Field(12, ge=1, description="partitions of the raw topic")
    backend: Literal["process", "docker", "swarm"] = Field(
        "docker", description="whose measured start-up and rebalance pauses"
    )
    min_handlers: int = Field(1, ge=0, description="fewest handlers")
    max_handlers: int = Field(12, ge=1, description="most handlers")
    lag_target_s: float = Field(5.0, gt=0, description="lag to keep below, seconds")
    session_min: str = Field("", description="e.g. open=8,close=4")
    lead_s: float = Field(120.0, ge=0, description="pre-scale lead, seconds")
    calendar: str = Field("XNYS", description="XNYS, XNAS, ... or none")

    # Output, and the suite instead of one day.
    json_out: bool = Field(
        False, description="one JSON object on stdout", json_schema_extra={"flag": "--json"}
    )
    plot: Path | None = Field(None, description="write a PNG chart here")
    suite: bool = Field(False, description="every day shape, several seeds, one table")
    seeds: int = Field(5, ge=1, description="--suite: seeds per day")
    days: str = Field("", description="--suite: comma-separated day names")
    workers: int = Field(2, ge=1, description="--suite: processes")

    @field_validator("plot")
    @classmethod
    def _plot(cls, v: Path | None) -> Path | None:
        return check_out_file(v)

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min_handlers > self.max_handlers:
            raise ValueError(
                f"min_handlers ({self.min_handlers}) > max_handlers ({self.max_handlers})"
            )
        return self
