"""What compose/ resolves to, checked through `docker-compose config`: every
published port on 127.0.0.1, Prometheus without its lifecycle API, the Docker
socket mounted only into the gates, and no stack from an unedited .env.example.

Needs only the compose client (no engine, no images): the files are resolved,
nothing is started.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

COMPOSE_DIR = Path(__file__).resolve().parent.parent / "compose"
VARIANTS = ((), ("swarm.yml",))
PASSWORDS = ("REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD")


def _compose() -> list[str]:
    v1 = shutil.which("docker-compose")
    if v1:
        return [v1]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    pytest.skip("needs docker compose (v2 plugin) or docker-compose (v1)")


def _config(
    tmp_path: Path, variant: tuple[str, ...], **settings: str
) -> subprocess.CompletedProcess:
    env_file = tmp_path / f"{uuid.uuid4().hex}.env"
    text = (COMPOSE_DIR / ".env.example").read_text()
    env_file.write_text(text + "".join(f"\n{k}={v}" for k, v in settings.items()) + "\n")
    files = [a for f in ("docker-compose.yml", *variant) for a in ("-f", str(COMPOSE_DIR / f))]
    clean = {k: v for k, v in __import__("os").environ.items() if k not in PASSWORDS}
    return subprocess.run(
        [*_compose(), *files, "--env-file", str(env_file), "config"],
        capture_output=True, text=True, timeout=60, check=False, env=clean,
    )  # fmt: skip


def _services(config: str) -> dict[str, str]:
    """Each service's block of the resolved YAML, by name."""
    body = config.split("\nservices:\n", 1)[1]
    body = re.split(r"\n(?=\S)", body, maxsplit=1)[0]
    parts = re.split(r"\n  (?=[A-Za-z0-9_-]+:\n)", "\n" + body)
    return {p.split(":", 1)[0].strip(): p for p in parts if p.strip()}


@pytest.mark.parametrize("variant", VARIANTS, ids=["main", "swarm"])
def test_published_ports_socket_and_prometheus_flags(
    tmp_path: Path, variant: tuple[str, ...]
) -> None:
    r = _config(tmp_path, variant, **{k: uuid.uuid4().hex for k in PASSWORDS})
    assert r.returncode == 0, r.stderr
    services = _services(r.stdout)
    assert {"kafka", "redis", "scaler", "prometheus", "docker-gate", "docker-gate-ro"} <= set(
        services
    )
    published = re.findall(r"\n    ports:\n((?:    - .*\n)+)", r.stdout)
    entries = [e.strip()[2:] for block in published for e in block.splitlines()]
    assert len(entries) == 3, entries
    assert all(e.startswith("127.0.0.1:") for e in entries), entries
    assert "--web.enable-lifecycle" not in services["prometheus"]
    with_socket = {n for n, block in services.items() if "/var/run/docker.sock" in block}
    assert with_socket == {"docker-gate", "docker-gate-ro"}, with_socket
    assert "DOCKER_HOST: tcp://docker-gate:2375" in services["scaler"]
    # The gate is reachable from the scaler, and from nothing on the md network.
    assert "dockerapi-scaler" in services["scaler"]
    assert "md:" not in services["docker-gate"] and "md:" not in services["docker-gate-ro"]


@pytest.mark.parametrize("unset", PASSWORDS)
def test_an_unedited_env_example_is_refused_naming_the_setting(tmp_path: Path, unset: str) -> None:
    others = {k: uuid.uuid4().hex for k in PASSWORDS if k != unset}
    r = _config(tmp_path, (), **others)
    assert r.returncode != 0, r.stdout
    assert f"set {unset} in compose/.env" in r.stderr, r.stderr
