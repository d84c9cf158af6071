"""Configuration of one ``tickscale verify`` run (environment ``TICKSCALE_VERIFY_*``, flags
win)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.constants import DEADLETTER_TOPIC, RAW_TOPIC, TICKS_TOPIC
from core.validation import check_bootstrap, check_out_file

_AS_REPLAYED = "--source: as given to replay"


class VerifySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TICKSCALE_VERIFY_", extra="forbid")

    manifest: Path | None = Field(None, description="manifest written by replay")
    source: Path | None = Field(
        None, description="or: the replayed file (ITCH or JSON lines); expectations come from it"
    )
    day: str | None = Field(
        None, description="--source ITCH: trading date, as given to replay",
        json_schema_extra={"flag": "--date"},
    )  # fmt: skip
    start: str | None = Field(None, description=_AS_REPLAYED, json_schema_extra={"flag": "--from"})
    end: str | None = Field(None, description=_AS_REPLAYED, json_schema_extra={"flag": "--to"})
    only: str | None = Field(None, description=_AS_REPLAYED)
    bootstrap: str = Field("127.0.0.1:9092", description="Kafka HOST:PORT")
    topic: str = Field(TICKS_TOPIC, description="tick topic")
    raw_topic: str = Field(
        RAW_TOPIC, description="--source: raw topic (market-wide dead letters, one per partition)"
    )
    deadletter_topic: str = Field(
        DEADLETTER_TOPIC, description="dead-letter topic to account for ('' = skip)"
    )
    connect_timeout_s: float = Field(
        10.0, gt=0, description="seconds to wait for a broker, retrying, before giving up"
    )
    outage_deadline_s: float = Field(
        300.0,
        ge=1,
        description="seconds a broker lost mid-read may stay away before verify gives up "
        "(exit 3: nothing concluded)",
    )
    timeout_s: float = Field(
        0.0, ge=0, description="wait up to N s for all expected ticks (0 = read what is there)"
    )
    json_out: Path | None = Field(
        None, description="write results as JSON", json_schema_extra={"flag": "--json"}
    )

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        return check_bootstrap(v)

    @field_validator("json_out")
    @classmethod
    def _json_out(cls, v: Path | None) -> Path | None:
        return check_out_file(v)
