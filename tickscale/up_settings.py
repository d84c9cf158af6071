"""Configuration of ``tickscale up`` (environment ``TICKSCALE_UP_*``, flags win)."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.validation import check_out_dir, check_speed


def _full(description: str) -> str:
    return f"--full-day: {description}"


class UpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TICKSCALE_UP_", extra="forbid")

    full_day: bool = Field(
        False,
        description="the longer day on the standard ports (9092, 6379), about 16 minutes at "
        "--speed 60; without it, a day compressed into about two minutes with a live view "
        "and an HTML report",
    )
    seed: int = Field(1, description="the synthetic day's seed")
    day: str | None = Field(
        None, description="trading date YYYY-MM-DD (default: last session)",
        json_schema_extra={"flag": "--date"},
    )  # fmt: skip
    out: Path | None = Field(None, description="compressed day: where its report and logs go")

    # The longer day only (FULL_DAY_ONLY).
    symbols: int = Field(50, ge=1, description=_full("instruments"))
    speed: str = Field("60", description=_full("replay speed, a number or max"))
    handlers: int = Field(2, ge=1, description=_full("handlers (the scaler's minimum)"))
    max_handlers: int = Field(4, ge=1, description=_full("the scaler's maximum"))
    scaler: bool = Field(
        True, description=_full("let the scaler size the fleet (off: a fixed fleet)")
    )
    start: str | None = Field(
        None, description=_full("start HH:MM"), json_schema_extra={"flag": "--from"}
    )
    end: str | None = Field(
        None, description=_full("end HH:MM"), json_schema_extra={"flag": "--to"}
    )
    partitions: int = Field(12, ge=1, description=_full("md.raw partitions"))
    kafka_port: int = Field(9092, ge=1, le=65535, description=_full("the broker's port"))
    redis_port: int = Field(6379, ge=1, le=65535, description=_full("Redis's port"))
    state_dir: Path = Field(Path(".local/up"), description=_full("broker and Redis data"))
    metrics_port: int = Field(
        9100, ge=1, le=65535, description=_full("first handler's metrics port")
    )
    scaler_port: int = Field(9200, ge=1, le=65535, description=_full("the scaler's metrics port"))
    reset: bool = Field(
        False,
        description=_full(
            "reset a broker or Redis already listening on the port (delete its md.* topics, "
            "the handlers' consumer group, the book snapshots) instead of refusing"
        ),
    )

    @field_validator("speed")
    @classmethod
    def _speed(cls, v: str) -> str:
        return check_speed(v)

    @field_validator("out")
    @classmethod
    def _out(cls, v: Path | None) -> Path | None:
        return check_out_dir(v)

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, v: Path, info: ValidationInfo) -> Path:
        # Only the longer day keeps its broker and Redis there (full_day comes first).
        if info.data.get("full_day"):
            check_out_dir(v)
        return v

    @model_validator(mode="after")
    def _fleet(self) -> Self:
        if self.handlers > self.max_handlers:
            raise ValueError(f"handlers ({self.handlers}) > max_handlers ({self.max_handlers})")
        return self


# Settings that describe the longer day; given with the compressed one, they are a mistake.
FULL_DAY_ONLY = (
    "symbols", "speed", "handlers", "max_handlers", "scaler", "start", "end", "partitions",
    "kafka_port", "redis_port", "state_dir", "metrics_port", "scaler_port", "reset",
)  # fmt: skip
