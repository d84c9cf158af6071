"""What a handler service is made of: its name for a version, and its create arguments.

Every version of a fleet's handlers runs as its own replicated service, all
made from the same settings (network, secrets, limits, grace period) and told
apart by ``io.tickscale.version``; only the image differs.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from docker.errors import NotFound
from docker.types import Healthcheck, Resources, RestartPolicy, SecretReference, ServiceMode

from scaler.backends.base import BackendError, HandlerSpec, HandlerVersion
from scaler.backends.docker import (
    CONTAINER_METRICS_PORT,
    LABEL_METRICS_PORT,
    LABEL_VERSION,
    ContainerShape,
)

# The image's user (Dockerfile), owner of the secret files in a task.
_UID = "10001"
# Swarm refuses service names longer than this.
_MAX_NAME = 63


def service_name(base: str, version: HandlerVersion, base_version: str) -> str:
    """``base`` for the version the scaler was started with, else ``base-<slug>``: one
    name per version, so a restarted scaler finds a rollout's service by it."""
    if version.name == base_version:
        return base
    slug = re.sub(r"[^a-z0-9]+", "-", version.name.lower()).strip("-") or "v"
    name = f"{base}-{slug}"
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha1(version.name.encode()).hexdigest()[:8]
    return f"{name[: _MAX_NAME - 9].rstrip('-')}-{digest}"


def secret_refs(client: Any, secrets: dict[str, str]) -> list[SecretReference]:
    """Each swarm secret as /run/secrets/<file>, readable by the image's user only."""
    refs = []
    for file, name in secrets.items():
        try:
            secret = client.secrets.get(name)
        except NotFound as e:
            raise BackendError(
                f"handler_secrets: no swarm secret {name!r} (create it with `docker secret create`)"
            ) from e
        refs.append(SecretReference(secret.id, name, filename=file, uid=_UID, gid=_UID, mode=0o400))
    return refs


def service_args(
    spec: HandlerSpec, shape: ContainerShape, *, name: str, version: HandlerVersion,
    labels: dict[str, str], replicas: int, stop_grace_s: float,
) -> dict[str, Any]:  # fmt: skip
    """``client.services.create`` keyword arguments (the image aside; secrets apart)."""
    host = shape.network == "host"
    env = spec.env() | {
        # Service templates: each task gets its own handler id.
        "TICKSCALE_HANDLER_HANDLER_ID": "{{.Task.Name}}",
        "TICKSCALE_HANDLER_VERSION": version.name,
        # On the host network replicas on one node would fight over one
        # port: any free port then, and no port-based health check.
        "TICKSCALE_HANDLER_METRICS_PORT": "0" if host else str(CONTAINER_METRICS_PORT),
        "TICKSCALE_METRICS_PORT": "0" if host else str(CONTAINER_METRICS_PORT),
    }
    labels = labels | {LABEL_VERSION: version.name}
    kwargs: dict[str, Any] = {
        "name": name,
        # A service's "command" replaces the image ENTRYPOINT; args are its CMD.
        "args": ["handler"],
        "env": [f"{k}={v}" for k, v in env.items()],
        "labels": labels,
        "container_labels": labels
        | ({} if host else {LABEL_METRICS_PORT: str(CONTAINER_METRICS_PORT)}),
        "mode": ServiceMode("replicated", replicas=replicas),
        "stop_grace_period": int(stop_grace_s * 1e9),
        # Swarm keeps the replica count itself; the delay stops a crashing
        # handler from spinning.
        "restart_policy": RestartPolicy(condition="any", delay=int(5e9)),
        "read_only": True,
        "log_driver": "json-file",
        "log_driver_options": {"max-size": "10m", "max-file": "3"},
    }
    if host:
        kwargs["healthcheck"] = Healthcheck(test=["NONE"])
    if shape.network:
        kwargs["networks"] = [shape.network]
    resources: dict[str, int] = {}
    if shape.cpus:
        resources["cpu_limit"] = int(shape.cpus * 1e9)
    if shape.mem_mb:
        resources["mem_limit"] = shape.mem_mb * 1024 * 1024
    if resources:
        kwargs["resources"] = Resources(**resources)
    return kwargs
