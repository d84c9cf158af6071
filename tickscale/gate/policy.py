"""What the gate lets through: pure decisions on one Docker API request.

A request is allowed outright (ping, version, listing, reading the handler
image or network), refused with a reason, or allowed only if the object it
names carries this fleet's labels (``Owned``): the server then reads the
object's labels from the engine and decides. Creation bodies are checked
field by field against allow-lists, so a field the Docker API gains later is
refused until someone decides it is harmless.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

import orjson

from core.constants import LABEL_ROLE, LABEL_SCALER, LEAVE_SIGNAL
from core.secrets import SECRETS_DIR
from tickscale.gate.settings import GateSettings

ROLE_HANDLER = "handler"
_VERSION = re.compile(r"^/v[0-9.]+(?=/)")

# HostConfig fields a handler container may set to anything: resources, logs,
# restart, a read-only root with tmpfs. Everything else must be empty.
_HOST_CONFIG_FREE = {
    "ReadonlyRootfs", "Tmpfs", "LogConfig", "RestartPolicy", "NanoCpus", "CpuShares",
    "CpuQuota", "CpuPeriod", "Memory", "MemorySwap", "MemoryReservation", "PidsLimit",
    "Init", "AutoRemove", "ShmSize", "CapDrop", "ConsoleSize", "Ulimits",
}  # fmt: skip
# An empty list here is not "unset": it unmasks /proc and /sys paths.
_HOST_CONFIG_NEVER = {"MaskedPaths", "ReadonlyPaths"}
# ContainerSpec fields of a Swarm handler task that may be anything.
_TASK_SPEC_FREE = {
    "Image", "Labels", "Command", "Args", "Env", "Dir", "ReadOnly", "StopGracePeriod", "Secrets",
    "StopSignal", "Healthcheck", "Init", "Hostname", "Isolation",
}  # fmt: skip
_TASK_TEMPLATE_FREE = {"ContainerSpec", "Resources", "RestartPolicy", "Placement", "LogDriver",
                       "Networks", "ForceUpdate", "Runtime"}  # fmt: skip
_SERVICE_FREE = {"name", "labels", "tasktemplate", "mode", "updateconfig", "rollbackconfig",
                 "endpointspec"}  # fmt: skip
# Compared with folded field names (see _fold).
_HOST_CONFIG_FREE = {k.lower() for k in _HOST_CONFIG_FREE}
_HOST_CONFIG_NEVER = {k.lower() for k in _HOST_CONFIG_NEVER}
_TASK_SPEC_FREE = {k.lower() for k in _TASK_SPEC_FREE}
_TASK_TEMPLATE_FREE = {k.lower() for k in _TASK_TEMPLATE_FREE}


@dataclass(frozen=True)
class Allow:
    pass


@dataclass(frozen=True)
class Refuse:
    reason: str


@dataclass(frozen=True)
class Owned:
    """Allowed if the container or service ``ref`` carries this fleet's labels."""

    kind: Literal["container", "service"]
    ref: str


Decision = Allow | Refuse | Owned


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == 0 or v is False or v == [] or v == {}


# Fields whose values are maps of user data (label names, paths, network
# names): their keys are data, matched exactly, and are not folded.
_DATA_MAPS = {"labels", "tmpfs", "config", "sysctls", "endpointsconfig", "volumes",
              "exposedports", "portbindings", "storageopt", "driveropts", "options"}  # fmt: skip


def _fold(value: Any) -> Any:
    """Field names in lower case, as the engine matches them (Go's JSON decoding
    ignores case: "privileged" sets Privileged). Two names that fold to one
    would leave it to the engine which wins: refused."""
    if isinstance(value, list):
        return [_fold(v) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for k, v in value.items():
        key = k.lower()
        if key in out:
            raise ValueError(f"field {k!r} given twice")
        out[key] = v if key in _DATA_MAPS and isinstance(v, dict) else _fold(v)
    return out


def _json(body: bytes) -> dict[str, Any] | None:
    """The body with folded field names; None if it is not one JSON object."""
    try:
        doc = _fold(orjson.loads(body or b"{}"))
    except (orjson.JSONDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class Policy:
    def __init__(self, settings: GateSettings) -> None:
        self.s = settings
        # The engine writes a service's networks back as ids: the server fills
        # in the configured network's id once it has read it.
        self.network_ids: set[str] = set()

    def labels_ok(self, labels: dict[str, str] | None) -> bool:
        labels = labels or {}
        return labels.get(LABEL_ROLE) == ROLE_HANDLER and labels.get(LABEL_SCALER) == self.s.fleet

    def decide(self, method: str, raw_path: str, body: bytes, query: str = "") -> Decision:
        path = _VERSION.sub("", raw_path, count=1)
        if method in ("GET", "HEAD") and path in ("/_ping", "/version"):
            return Allow()
        if self.s.mode == "observe":
            if method == "GET" and path in ("/containers/json", "/networks"):
                return Allow()
            return Refuse(f"{method} {path}: this gate only lists containers and networks")
        if method == "GET" and path.startswith("/images/") and path.endswith("/json"):
            if path[len("/images/") : -len("/json")] in self.s.images:
                return Allow()  # the backend checks its image is there
        if method == "GET" and self.s.network and path == f"/networks/{self.s.network}":
            return Allow()
        if self.s.mode == "swarm" and method == "GET" and path in self._secret_paths():
            return Allow()  # metadata only: the engine never returns a secret's data
        if self.s.mode == "swarm":
            return self._swarm(method, path, body)
        return self._containers(method, path, body, query)

    def _secret_paths(self) -> set[str]:
        return {f"/secrets/{name}" for name in self.s.secrets.values()}

    # Containers ------------------------------------------------------------------------

    def _containers(self, method: str, path: str, body: bytes, query: str = "") -> Decision:
        if method == "GET" and path == "/containers/json":
            return Allow()
        if method == "POST" and path == "/containers/create":
            return self._create(body)
        m = re.fullmatch(r"/containers/([A-Za-z0-9_.-]+)(/json|/start|/stop|/kill)?", path)
        if m:
            action = m.group(2) or ""
            if (method, action) in (("GET", "/json"), ("POST", "/start"), ("POST", "/stop"),
                                    ("DELETE", "")):  # fmt: skip
                return Owned("container", m.group(1))
            if (method, action) == ("POST", "/kill"):
                # Only the rollout's "you are being replaced" (the handler leaves the group
                # at the next rebalance); a stop is /stop, with its grace period.
                sig = parse_qs(query).get("signal", [""])
                if sig == [LEAVE_SIGNAL]:
                    return Owned("container", m.group(1))
                return Refuse(f"kill: only signal={LEAVE_SIGNAL} (a handler's replacement)")
        return Refuse(f"{method} {path} is not a handler operation")

    def _create(self, body: bytes) -> Decision:
        doc = _json(body)
        if doc is None:
            return Refuse("create: the body is not a JSON object")
        if doc.get("image") not in self.s.images:
            allowed = ", ".join(sorted(self.s.images))
            return Refuse(f"create: image {doc.get('image')!r} is not one of {allowed}")
        if not self.labels_ok(doc.get("labels")):
            return Refuse(
                f"create: labels must include {LABEL_ROLE}={ROLE_HANDLER} and "
                f"{LABEL_SCALER}={self.s.fleet}"
            )
        if not _empty(doc.get("user")):
            return Refuse("create: the image's own user only (no User)")
        host = doc.get("hostconfig") or {}
        if not isinstance(host, dict):
            return Refuse("create: HostConfig is not an object")
        for key, value in host.items():
            if key in _HOST_CONFIG_NEVER and value is not None:
                return Refuse(f"create: HostConfig.{key} may not be set")
            if key in _HOST_CONFIG_FREE or key in ("networkmode", "securityopt", "binds"):
                continue
            if not _empty(value):
                return Refuse(f"create: HostConfig.{key} may not be set (got {value!r})")
        for opt in host.get("securityopt") or []:
            if not str(opt).startswith("no-new-privileges"):
                return Refuse(f"create: security option {opt!r} is not allowed")
        binds = host.get("binds") or []
        secret_binds = {f"{src}:{SECRETS_DIR}/{n}:ro" for n, src in self.s.secrets.items()}
        if not isinstance(binds, list) or not set(map(str, binds)) <= secret_binds:
            return Refuse(
                f"create: HostConfig.binds may only be the handler secrets {sorted(secret_binds)} "
                f"(got {binds!r})"
            )
        volumes = doc.get("volumes") or {}
        targets = {f"{SECRETS_DIR}/{name}" for name in self.s.secrets}
        if not isinstance(volumes, dict) or not set(volumes) <= targets or any(volumes.values()):
            return Refuse("create: no volumes")
        return self._network(host.get("networkmode"), doc.get("networkingconfig"))

    def _network(self, mode: str | None, networking: Any) -> Decision:
        mode = mode or "default"
        allowed = {self.s.network} if self.s.network else {"default", "bridge"}
        if self.s.allow_host_network:
            allowed.add("host")
        if mode not in allowed:
            return Refuse(f"create: network mode {mode!r} is not one of {sorted(allowed)}")
        endpoints = (networking or {}).get("endpointsconfig") or {}
        extra = set(endpoints) - allowed
        if extra:
            return Refuse(f"create: networks {sorted(extra)} are not allowed")
        return Allow()

    # Swarm -----------------------------------------------------------------------------

    def _swarm(self, method: str, path: str, body: bytes) -> Decision:
        if method == "GET" and path in ("/info", "/services", "/tasks"):
            return Allow()
        if method == "POST" and path == "/services/create":
            return self._service(body)
        m = re.fullmatch(r"/services/([A-Za-z0-9_.-]+)(/update)?", path)
        if m and method in ("GET", "DELETE") and not m.group(2):
            return Owned("service", m.group(1))
        if m and method == "POST" and m.group(2):
            checked = self._service(body)
            return Owned("service", m.group(1)) if isinstance(checked, Allow) else checked
        return Refuse(f"{method} {path} is not a handler-service operation")

    def _service(self, body: bytes) -> Decision:
        doc = _json(body)
        if doc is None:
            return Refuse("service: the body is not a JSON object")
        if not self.labels_ok(doc.get("labels")):
            return Refuse(f"service: labels must include {LABEL_SCALER}={self.s.fleet}")
        if not _empty((doc.get("endpointspec") or {}).get("ports")):
            return Refuse("service: no published ports")
        if set(doc.get("mode") or {}) - {"replicated"}:
            return Refuse("service: only replicated services")
        for key, value in doc.items():
            if key not in _SERVICE_FREE and not _empty(value):
                return Refuse(f"service: {key} may not be set")
        task = doc.get("tasktemplate") or {}
        for key, value in task.items():
            if key not in _TASK_TEMPLATE_FREE and not _empty(value):
                return Refuse(f"service: TaskTemplate.{key} may not be set")
        spec = task.get("containerspec") or {}
        image = str(spec.get("image", "")).split("@", 1)[0]
        if image not in self.s.images:  # a rollout's version runs as a service of its own
            allowed = ", ".join(sorted(self.s.images))
            return Refuse(f"service: image {spec.get('image')!r} is not one of {allowed}")
        if not self.labels_ok(spec.get("labels")):
            return Refuse("service: ContainerSpec labels must name this fleet")
        for key, value in spec.items():
            if key not in _TASK_SPEC_FREE and not _empty(value):
                return Refuse(f"service: ContainerSpec.{key} may not be set")
        for ref in spec.get("secrets") or []:
            file = (ref.get("file") or {}) if isinstance(ref, dict) else {}
            name = ref.get("secretname") if isinstance(ref, dict) else None
            if self.s.secrets.get(str(file.get("name"))) != name or name is None:
                return Refuse(f"service: secret {ref!r} is not one of the handler secrets")
        for net in task.get("networks") or []:
            target = net.get("target") if isinstance(net, dict) else net
            ok = target == self.s.network or target in self.network_ids
            if not ok and not (target == "host" and self.s.allow_host_network):
                return Refuse(f"service: network {target!r} is not allowed")
        return Allow()
