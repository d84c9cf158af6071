"""Settings of ``tickscale scaler keda``: the scaler's own, plus where to serve KEDA.

The policy, its signals and its bounds are the scaler's settings, read the same way
(``TICKSCALE_SCALER_*``, flags win). Settings that only say how to run handlers have no
flag here: in Kubernetes the handler Deployment's pod spec says that.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from scaler.settings import ScalerSettings

# What a backend needs to start handlers, or a rollout to replace them: Kubernetes does
# both here (the handler Deployment and its rolling update), so these have no flag.
HANDLER_ONLY = (
    "out_topic", "deadletter_topic", "handler_bootstrap", "handler_redis_url",
    "handler_secrets", "handler_kafka_username", "backend", "stop_grace_s",
    "stop_handlers_on_exit", "image", "network", "handler_cpus", "handler_mem_mb",
    "docker_host", "swarm_service", "rollout_guard", "handler_base_port", "state_dir",
    "handler_parent_pid",
)  # fmt: skip


def check_listen(v: str) -> tuple[str, int]:
    """(host, port) of ``HOST:PORT`` (an IPv6 host in brackets), or ValueError."""
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT such as 0.0.0.0:9090, got {v!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"an IPv6 host goes in brackets, e.g. [::]:9090, got {v!r}")
    return host, int(port)


class KedaSettings(ScalerSettings):
    listen: str = Field(
        "0.0.0.0:9090", description="HOST:PORT the KEDA external scaler (gRPC) listens on"
    )
    activation_lag: int = Field(
        0, ge=0, description="IsActive is true while the group's lag exceeds this many messages"
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        check_listen(v)
        return v
