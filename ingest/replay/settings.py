"""Configuration of one replay process (environment ``TICKSCALE_REPLAY_*``, flags win)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.constants import RAW_TOPIC
from core.validation import check_bootstrap, check_speed
from ingest.replay.source import MAX_LINE_BYTES
from ingest.replay.spec import SourceSpec


class ReplaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TICKSCALE_REPLAY_", extra="forbid")

    manifest: Path = Field(description="where to write the manifest (JSON), as the replay goes")
    bootstrap: str = Field("127.0.0.1:9092", description="Kafka HOST:PORT")
    topic: str = Field(RAW_TOPIC, description="raw topic")

    # The source (see SourceSpec).
    source: str = Field("synthetic", description="synthetic | itch | jsonl")
    file: Path | None = Field(None, description="input file for itch/jsonl")
    symbols: int = Field(50, ge=1, description="synthetic: instruments")
    seed: int = Field(1, description="synthetic: the day's seed")
    rate: float = Field(1.0, ge=0.001, description="synthetic: midday msgs/s per symbol")
    day: str | None = Field(
        None, description="trading date YYYY-MM-DD (default: last session)",
        json_schema_extra={"flag": "--date"},
    )  # fmt: skip
    start: str | None = Field(
        None, description="start HH:MM (exchange time)", json_schema_extra={"flag": "--from"}
    )
    end: str | None = Field(
        None, description="end HH:MM (exchange time)", json_schema_extra={"flag": "--to"}
    )
    malformed_every: int = Field(
        0, ge=0, description="inject a malformed message after every N (0 = none)"
    )
    only: str | None = Field(
        None, description="only these symbols, comma-separated (and market-wide messages)"
    )
    max_line_bytes: int = Field(
        MAX_LINE_BYTES, ge=64, description="jsonl: the longest line accepted, in bytes"
    )

    # Pace and robustness.
    speed: str = Field("1", description="1 = real time, 60 = a minute per second, max")
    progress: bool = Field(True, description="show a progress bar")
    redis_url: str | None = Field(
        None, description="Redis URL: publish the replay clock for the scaler",
        json_schema_extra={"flag": "--redis"},
    )  # fmt: skip
    resume: bool = Field(
        False,
        description="carry on the replay whose incomplete --manifest is there (same options): "
        "what it sent is not sent again",
    )
    outage_deadline_s: float = Field(
        300.0,
        ge=1,
        description="seconds the broker may acknowledge nothing (down, restarting) before "
        "the replay gives up",
    )
    connect_timeout_s: float = Field(
        10.0, ge=0, description="seconds to wait for a broker before the first record"
    )
    checkpoint_every_s: float = Field(
        5.0, ge=0.1, description="seconds between manifest checkpoints"
    )

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        return check_bootstrap(v)

    @field_validator("speed")
    @classmethod
    def _speed(cls, v: str) -> str:
        return check_speed(v)

    @property
    def pace(self) -> float | None:
        """Replay speed as a multiple of real time; None: as fast as the broker takes it."""
        return None if self.speed == "max" else float(self.speed)

    def spec(self) -> SourceSpec:
        return SourceSpec(
            source=self.source, symbols=self.symbols, seed=self.seed, file=self.file,
            rate=self.rate, day=self.day, start=self.start, end=self.end,
            malformed_every=self.malformed_every, only=self.only,
            max_line_bytes=self.max_line_bytes,
        )  # fmt: skip
