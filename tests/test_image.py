"""The tickscale container image (../Dockerfile), as built by .ci/docker.sh.

Checks what must hold for every build: it runs as a non-root user, carries no
build secret (the CA bundle passed with ``--secret id=cacert``) in any layer,
its history or its environment, ``tickscale --help`` works inside it, and it
declares a HEALTHCHECK on the handler's /healthz.

Skipped when no Docker engine answers. When the engine answers but the image
is missing, skipped locally (run ``bash .ci/docker.sh``) and failed under CI.
Image under test: $TICKSCALE_IMAGE, default ``tickscale:dev``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tickscale.localstack.net import free_port

pytestmark = pytest.mark.docker

IMAGE = os.environ.get("TICKSCALE_IMAGE", "tickscale:dev")
REPO = Path(__file__).resolve().parent.parent
COMPOSE_DIR = REPO / "compose"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Where Debian keeps the stock CAs; anything else in the host bundle is local
# (e.g. a TLS-intercepting proxy's CA) and must never end up in the image.
STOCK_CA_DIR = Path("/usr/share/ca-certificates")
BUILD_SECRET_PATHS = ("run/secrets/",)
SECRET_ENV_NAMES = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE")

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


def _docker_cli() -> str | None:
    env = os.environ.get("DOCKER")
    if env:
        return env
    return shutil.which("docker")


def _docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    cli = _docker_cli()
    assert cli is not None
    return subprocess.run(
        [cli, *args], capture_output=True, text=True, check=check, timeout=timeout
    )


@functools.cache
def _engine_problem() -> str | None:
    cli = _docker_cli()
    if cli is None:
        return "no docker CLI on PATH"
    try:
        r = subprocess.run([cli, "info"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`docker info` failed: {e}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"`docker info` failed (no running engine?): {last}"
    return None


@pytest.fixture(scope="module")
def image() -> dict:
    problem = _engine_problem()
    if problem:
        pytest.skip(f"needs a Docker engine: {problem}")
    r = _docker("image", "inspect", IMAGE, check=False)
    if r.returncode != 0:
        msg = f"image {IMAGE} not built: run `bash .ci/docker.sh`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return json.loads(r.stdout)[0]


def test_runs_as_non_root(image: dict) -> None:
    user = image["Config"].get("User") or ""
    assert user, "image has no USER: it would run as root"
    assert user.split(":")[0] not in ("root", "0")
    out = _docker("run", "--rm", "--entrypoint", "id", IMAGE).stdout
    assert "uid=0(" not in out, out
    assert "uid=10001(tickscale)" in out, out


def test_tickscale_help_runs(image: dict) -> None:
    r = _docker("run", "--rm", "--read-only", IMAGE, "--help")
    for role in ("handler", "replay"):
        assert role in r.stdout, r.stdout
    assert image["Config"]["Entrypoint"] == ["tickscale"]


def test_healthcheck_hits_handler_healthz(image: dict) -> None:
    hc = image["Config"].get("Healthcheck") or {}
    test = " ".join(hc.get("Test") or [])
    assert test, "no HEALTHCHECK in the image"
    assert "/healthz" in test and "TICKSCALE_METRICS_PORT" in test, test
    assert "curl" not in test and "wget" not in test, "the image has neither: use python"
    env = dict(e.split("=", 1) for e in image["Config"].get("Env") or [])
    assert env.get("TICKSCALE_METRICS_PORT") == "9100"


def test_oci_labels(image: dict) -> None:
    labels = image["Config"].get("Labels") or {}
    for key in ("org.opencontainers.image.version", "org.opencontainers.image.source"):
        assert key in labels, f"missing label {key}"
    assert labels["org.opencontainers.image.version"], "empty version label"


def test_no_secret_in_env(image: dict) -> None:
    for entry in image["Config"].get("Env") or []:
        name, _, value = entry.partition("=")
        assert name not in SECRET_ENV_NAMES, f"{name} baked into the image env"
        assert "/run/secrets" not in value and "cacert" not in value.lower(), entry


def test_no_secret_in_history(image: dict) -> None:
    out = _docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE).stdout
    for needle in ("PIP_CERT", "/run/secrets", "cacert", "ca-certificates.crt"):
        assert needle not in out, f"{needle!r} in the image history:\n{out}"


def _host_only_certs() -> set[bytes]:
    """Certificates in the host's CA bundle that are not Debian's stock CAs."""
    if not HOST_CA_BUNDLE.is_file():
        return set()

    def bodies(data: bytes) -> set[bytes]:
        return {re.sub(rb"\s+", b"", m) for m in _PEM.findall(data)}

    stock: set[bytes] = set()
    if STOCK_CA_DIR.is_dir():
        for crt in STOCK_CA_DIR.rglob("*.crt"):
            stock |= bodies(crt.read_bytes())
    return bodies(HOST_CA_BUNDLE.read_bytes()) - stock


def _layer_files(image_ref: str) -> Iterator[tuple[str, str, bytes | None]]:
    """(layer, path, content or None) for every file of every layer, streamed."""
    cli = _docker_cli()
    assert cli is not None
    proc = subprocess.Popen([cli, "save", image_ref], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as outer:
            for member in outer:
                is_layer = member.name.endswith("layer.tar") or member.name.startswith("blobs/")
                if not member.isfile() or not is_layer:
                    continue
                f = outer.extractfile(member)
                assert f is not None
                try:
                    inner = tarfile.open(fileobj=f, mode="r|*")
                except tarfile.ReadError:
                    continue  # an OCI blob that is a manifest/config, not a layer
                with inner:
                    for entry in inner:
                        content = None
                        if entry.isfile() and entry.size <= 4 << 20:
                            ef = inner.extractfile(entry)
                            content = ef.read() if ef is not None else None
                        yield member.name, entry.name, content
    finally:
        proc.stdout.close()
        assert proc.wait(timeout=120) == 0, "docker save failed"


def test_no_build_secret_in_any_layer(image: dict) -> None:
    host_only = _host_only_certs()
    host_bundle = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.is_file() else None
    hits: list[str] = []
    n_files = 0
    for layer, path, content in _layer_files(IMAGE):
        n_files += 1
        p = path.lstrip("./")
        if any(p.startswith(s) and p != s.rstrip("/") for s in BUILD_SECRET_PATHS):
            hits.append(f"{layer}: {path} (build-secret mount path)")
        if content is None:
            continue
        if host_bundle is not None and content == host_bundle:
            hits.append(f"{layer}: {path} is the host's CA bundle")
        if host_only and b"BEGIN CERTIFICATE" in content:
            flat = re.sub(rb"\s+", b"", content)
            for cert in host_only:
                if cert in flat:
                    hits.append(f"{layer}: {path} holds a host-only CA certificate")
                    break
        if b"PIP_CERT" in content and p.endswith(("pip.conf", "pip.ini", ".sh", "environment")):
            hits.append(f"{layer}: {path} sets PIP_CERT")
    assert n_files > 1000, f"read only {n_files} files from `docker save`: format not understood"
    assert not hits, "\n".join(hits)


# --- compose/docker-compose.yml -------------------------------------------------------

# Everything but the scaler/replay (long-running, the project's own behaviour is
# tested elsewhere) and Grafana (profile; no image here).
STACK = ("kafka", "redis", "topics", "docker-proxy-ro", "prometheus")


def _compose_cmd() -> list[str] | None:
    cli = _docker_cli()
    if cli and subprocess.run([cli, "compose", "version"], capture_output=True).returncode == 0:
        return [cli, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 else None


def _wait(what: str, cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _state(cid: str) -> dict:
    return json.loads(_docker("inspect", "--format", "{{json .State}}", cid).stdout)


@pytest.mark.slow
def test_compose_stack_comes_up(image: dict, tmp_path: Path) -> None:
    """kafka healthy, topics created (exit 0), redis healthy, prometheus ready,
    and the broker reachable from the host on the published EXTERNAL listener."""
    compose = _compose_cmd()
    if compose is None:
        pytest.skip("needs docker compose (v2 plugin) or docker-compose (v1)")
    project = f"tstest{uuid.uuid4().hex[:8]}"
    kafka_port, prom_port = free_port(), free_port()
    env = (COMPOSE_DIR / ".env.example").read_text()
    env += (
        f"\nCOMPOSE_PROJECT_NAME={project}\nREDIS_PASSWORD={uuid.uuid4().hex}\n"
        f"KAFKA_EXTERNAL_PORT={kafka_port}\nPROMETHEUS_PORT={prom_port}\n"
        f"TICKSCALE_NETWORK={project}-md\nTICKSCALE_IMAGE={IMAGE}\n"
    )
    env_file = tmp_path / "compose.env"
    env_file.write_text(env)
    base = [
        *compose,
        "-f",
        str(COMPOSE_DIR / "docker-compose.yml"),
        "--env-file",
        str(env_file),
        "-p",
        project,
    ]

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*base, *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    missing = [
        img
        for img in ("apache/kafka:3.9.2", "redis:7.0-bookworm", "prom/prometheus:v2.42.0")
        if _docker("image", "inspect", img, check=False).returncode != 0
    ]
    if missing:
        msg = f"images {missing} missing: run `bash .ci/docker.sh` (builds local stand-ins)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)

    ok = False
    try:
        r = run("up", "-d", *STACK)
        assert r.returncode == 0, r.stdout + r.stderr

        def cid(service: str) -> str:
            out = run("ps", "-q", service).stdout.strip()
            return out.splitlines()[0] if out else ""

        def topics_done() -> bool:
            c = cid("topics")
            return bool(c) and _state(c)["Status"] == "exited"

        _wait("the topics job", topics_done, 240)
        assert _state(cid("topics"))["ExitCode"] == 0, run("logs", "topics").stdout
        for svc in ("kafka", "redis"):
            _wait(
                f"{svc} healthy",
                lambda svc=svc: _state(cid(svc)).get("Health", {}).get("Status") == "healthy",
                120,
            )

        def prom_ready() -> bool:
            try:
                url = f"http://127.0.0.1:{prom_port}/-/ready"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        _wait("prometheus ready", prom_ready, 60)

        # From the host, through the advertised EXTERNAL listener: topics exist
        # already, so this is also the idempotency check of `tickscale topics`.
        r2 = subprocess.run(
            [sys.executable, "-m", "tickscale", "topics", "--bootstrap", f"127.0.0.1:{kafka_port}"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert r2.returncode == 0, r2.stdout + r2.stderr
        ok = True
    finally:
        if not ok:
            logs = run("logs", "--no-color", "--tail", "40", timeout=60)
            print(logs.stdout[-8000:], logs.stderr[-2000:])
        run("down", "-v", "--remove-orphans", timeout=180)
