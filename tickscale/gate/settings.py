"""Configuration of the gate (environment ``TICKSCALE_GATE_*``)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class GateSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TICKSCALE_GATE_", extra="forbid")

    # What the scaler may run: containers (or a Swarm service) of this image,
    # labelled for this fleet (the scaler's TICKSCALE_SCALER_NAME).
    # Unused in observe mode, which creates nothing.
    image: str = Field("", description="the only image containers may run")
    # Further images handler containers (swarm: services) may run, comma-separated, so
    # a handler rollout (tickscale rollout --image) can start its canary and fleet.
    rollout_images: str = Field("", description="other handler images allowed, a,b,...")
    fleet: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    # The one network handlers may join; host networking only when allowed.
    network: str | None = None
    allow_host_network: bool = False
    # The scaler's handler_secrets: file name under /run/secrets -> host file (docker
    # mode: the one bind mount allowed, read-only, at exactly that place) or swarm
    # secret (swarm mode: the one secret a task may reference, under that name).
    secrets: dict[str, str] = Field(default_factory=dict)
    # docker: the scaler's containers; swarm: its service; observe: read-only
    # listing of containers and networks (Prometheus' docker_sd).
    mode: Literal["docker", "swarm", "observe"] = "docker"

    @model_validator(mode="after")
    def _image_unless_observing(self) -> Self:
        if self.mode != "observe" and not self.image:
            raise ValueError("image: set TICKSCALE_GATE_IMAGE, the handler image")
        return self

    @property
    def images(self) -> frozenset[str]:
        """Every image a handler container may run."""
        extra = (i.strip() for i in self.rollout_images.split(","))
        return frozenset({self.image, *(i for i in extra if i)})

    # Where the gate listens and where the engine is.
    host: str = "0.0.0.0"
    port: int = Field(2375, ge=0, le=65535)
    engine_socket: str = "/var/run/docker.sock"
    # A stop waits for the handler's grace period: longer than that.
    engine_timeout_s: float = Field(120.0, gt=0)
