"""The tickscale container image (../Dockerfile), as built by .ci/docker.sh.

Checks what must hold for every build: it runs as a non-root user, carries no
build secret (the CA bundle passed with ``--secret id=cacert``) in any layer,
its history or its environment, ``tickscale --help`` works inside it, and it
declares a HEALTHCHECK on the handler's /healthz. Then the compose stack
(compose/docker-compose.yml) from that image and the local stand-ins: the
infrastructure alone, and the whole stack end to end with the scaler.

Skipped when no Docker engine answers. When the engine answers but the image
is missing, skipped locally (run ``bash .ci/docker.sh``) and failed under CI.
Image under test: $TICKSCALE_IMAGE, default ``tickscale:dev``.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.constants import LABEL_ROLE, LABEL_SCALER
from tests.docker_utils import DOCKER, docker, engine_problem
from tickscale.dashboards import (
    EVENT_ONLY,
    Failure,
    check_queries,
    extract_queries,
    load_dashboards,
    run_query,
)
from tickscale.localstack.net import free_port
from tickscale.stack_secrets import make_secrets

pytestmark = [pytest.mark.docker, pytest.mark.slow]

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


@pytest.fixture(scope="module")
def image() -> dict:
    problem = engine_problem()
    if problem:
        pytest.skip(f"needs a Docker engine: {problem}")
    r = docker("image", "inspect", IMAGE, check=False)
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
    out = docker("run", "--rm", "--entrypoint", "id", IMAGE).stdout
    assert "uid=0(" not in out, out
    assert "uid=10001(tickscale)" in out, out


def test_tickscale_help_runs(image: dict) -> None:
    r = docker("run", "--rm", "--read-only", IMAGE, "--help")
    for role in ("handler", "replay"):
        assert role in r.stdout, r.stdout
    assert image["Config"]["Entrypoint"] == ["tickscale"]


# A topic may be compressed with any codec Kafka has (tests/test_compressed_topics.py):
# the image's client must decompress them all, not only the one in the standard library.
READ_EVERY_CODEC = """
from aiokafka import codec
data = b"ITCH" * 1000
for name in ("gzip", "lz4", "snappy", "zstd"):
    encode, decode = getattr(codec, name + "_encode"), getattr(codec, name + "_decode")
    assert decode(encode(data)) == data, name
print("codecs ok")
"""


def test_the_image_reads_every_kafka_codec(image: dict) -> None:
    r = docker(
        "run", "--rm", "--read-only", "--entrypoint", "python3", IMAGE, "-c", READ_EVERY_CODEC
    )
    assert "codecs ok" in r.stdout, r.stdout + r.stderr


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
    out = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE).stdout
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
    assert DOCKER is not None
    proc = subprocess.Popen([DOCKER, "save", image_ref], stdout=subprocess.PIPE)
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

# The public images compose names; .ci/docker.sh builds local stand-ins for them.
STANDIN_IMAGES = (
    "apache/kafka:4.1.1",
    "redis:7.0-bookworm",
    "prom/prometheus:v2.42.0",
)


def _compose_cmd() -> list[str] | None:
    if (
        DOCKER
        and subprocess.run([DOCKER, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [DOCKER, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 else None


def _wait(what: str, cond: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _state(cid: str) -> dict:
    return json.loads(docker("inspect", "--format", "{{json .State}}", cid).stdout)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _handlers(fleet: str, *, all_states: bool = False) -> list[str]:
    """Ids of the handler containers a scaler named ``fleet`` labelled (running only by default)."""
    args = ["ps", "-q", "--no-trunc"]
    if all_states:
        args.append("-a")
    args += ["--filter", f"label={LABEL_ROLE}=handler", "--filter", f"label={LABEL_SCALER}={fleet}"]
    return docker(*args).stdout.split()


class ComposeStack:
    """One stack from compose/docker-compose.yml under its own project, network, ports, password.

    Settings are .env.example plus the overrides, in an env file of the test's
    own. Variables of the same names are dropped from the environment compose
    runs in, since compose would prefer them to the file.
    """

    def __init__(self, cmd: list[str], tmp_path: Path, *variants: str, **overrides: str) -> None:
        self.project = f"tstest{uuid.uuid4().hex[:8]}"
        self.kafka_port, self.prom_port = free_port(), free_port()
        self.network = f"{self.project}-md"
        # Its own password files, as `tickscale secrets` makes them for a user.
        self.secrets_dir = tmp_path / f"secrets-{self.project}"
        make_secrets(self.secrets_dir)
        settings = {
            "COMPOSE_PROJECT_NAME": self.project,
            "SECRETS_DIR": str(self.secrets_dir),
            "KAFKA_EXTERNAL_PORT": str(self.kafka_port),
            "PROMETHEUS_PORT": str(self.prom_port),
            "TICKSCALE_NETWORK": self.network,
            "TICKSCALE_IMAGE": IMAGE,
            **overrides,
        }
        text = (COMPOSE_DIR / ".env.example").read_text()
        text += "\n" + "".join(f"{k}={v}\n" for k, v in settings.items())
        self.env_file = tmp_path / "compose.env"
        self.env_file.write_text(text)
        names = {
            line.partition("=")[0].strip()
            for line in text.splitlines()
            if "=" in line and not line.lstrip().startswith("#")
        }
        self._environ = {k: v for k, v in os.environ.items() if k not in names}
        self._base = [
            *cmd,
            "-f",
            str(COMPOSE_DIR / "docker-compose.yml"),
            *(a for v in variants for a in ("-f", str(COMPOSE_DIR / v))),
            "--env-file",
            str(self.env_file),
            "-p",
            self.project,
        ]

    def client_env(self, principal: str) -> dict[str, str]:
        """The environment of a host tool that reaches the stack's Kafka as ``principal``:
        its password file of the stack's SECRETS_DIR as the tool's secret file."""
        folder = self.secrets_dir.parent / f"client-{self.project}-{principal}"
        folder.mkdir(mode=0o700, exist_ok=True)
        (folder / "tickscale_kafka_password").write_text(
            (self.secrets_dir / f"kafka_{principal}_password").read_text()
        )
        return self._environ | {
            "TICKSCALE_SECRETS_DIR": str(folder), "TICKSCALE_KAFKA_USERNAME": principal,
        }  # fmt: skip

    @property
    def prometheus(self) -> str:
        return f"http://127.0.0.1:{self.prom_port}"

    def run(
        self, *args: str, timeout: float = 300, shell_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """:param shell_env: variables set in the shell compose runs in, as a user sets
        one for one command (compose substitutes them before its env file's)"""
        return subprocess.run(
            [*self._base, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self._environ | (shell_env or {}),
        )

    def cid(self, service: str) -> str:
        out = self.run("ps", "-q", service).stdout.strip()
        return out.splitlines()[0] if out else ""

    def healthy(self, service: str) -> bool:
        return _state(self.cid(service)).get("Health", {}).get("Status") == "healthy"

    def logs(self, fleet: str | None = None) -> str:
        r = self.run("logs", "--no-color", "--tail", "60", timeout=60)
        text = r.stdout[-16000:] + r.stderr[-2000:]
        # The handler containers are the scaler's, not compose's: logs of their own.
        for cid in _handlers(fleet, all_states=True)[:4] if fleet else []:
            h = docker("logs", "--tail", "25", cid, check=False)
            text += f"\n--- handler container {cid[:12]}\n{(h.stdout + h.stderr)[-3000:]}"
        return text


def _compose_stack(tmp_path: Path, *variants: str, **overrides: str) -> ComposeStack:
    compose = _compose_cmd()
    if compose is None:
        pytest.skip("needs docker compose (v2 plugin) or docker-compose (v1)")
    missing = [
        img for img in STANDIN_IMAGES if docker("image", "inspect", img, check=False).returncode
    ]
    if missing:
        msg = f"images {missing} missing: run `bash .ci/docker.sh` (builds local stand-ins)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return ComposeStack(compose, tmp_path, *variants, **overrides)


# Everything but the scaler/replay (long-running, the project's own behaviour is
# tested elsewhere) and Grafana (no image can be obtained here).
STACK = ("kafka", "redis", "topics", "docker-gate-ro", "prometheus")
# The whole stack as users start it, less Grafana.
NOT_HERE = {"grafana"}
# One-off tools of the stack (the `tools` profile): run on demand, never by `up`.
TOOLS = {"verify"}


def test_compose_variants_resolve(image: dict, tmp_path: Path) -> None:
    """itch.yml and swarm.yml on top of the main file: what they change, and a
    missing ITCH setting named before anything starts."""
    itch_dir = tmp_path / "itch"
    itch_dir.mkdir()
    stack = _compose_stack(
        tmp_path, "itch.yml", ITCH_DIR=str(itch_dir), ITCH_FILE="day.itch.gz",
        ITCH_DATE="2024-11-25",
    )  # fmt: skip
    r = stack.run("config")
    assert r.returncode == 0, r.stderr
    assert "/itch/day.itch.gz" in r.stdout and f"{itch_dir}:/itch:ro" in r.stdout, r.stdout
    assert "synthetic" not in r.stdout  # the replay's command was replaced, not appended to
    assert "grafana" in stack.run("config", "--services").stdout.split()

    unset = _compose_stack(tmp_path, "itch.yml", ITCH_DIR=str(itch_dir), ITCH_DATE="2024-11-25")
    r = unset.run("config")
    assert r.returncode != 0 and "ITCH_FILE" in r.stderr, r.stdout + r.stderr

    swarm = _compose_stack(tmp_path, "swarm.yml")
    r = swarm.run("config")
    assert r.returncode == 0, r.stderr
    scaler = r.stdout.split("\n  scaler:\n", 1)[1].split("\n  topics:\n", 1)[0]
    assert "- swarm" in scaler and "tcp://docker-gate:2375" in scaler, scaler
    assert "driver: overlay" in r.stdout and "attachable: true" in r.stdout, r.stdout
    gate = r.stdout.split("\n  docker-gate:\n", 1)[1].split("\n  docker-gate-ro:\n", 1)[0]
    assert "TICKSCALE_GATE_MODE: swarm" in gate, gate


@pytest.mark.slow
def test_compose_stack_comes_up(image: dict, tmp_path: Path) -> None:
    """kafka healthy, topics created (exit 0), redis healthy, prometheus ready,
    and the broker reachable from the host on the published EXTERNAL listener."""
    stack = _compose_stack(tmp_path)
    ok = False
    try:
        r = stack.run("up", "-d", *STACK)
        assert r.returncode == 0, r.stdout + r.stderr

        def topics_done() -> bool:
            c = stack.cid("topics")
            return bool(c) and _state(c)["Status"] == "exited"

        _wait("the topics job", topics_done, 240)
        assert _state(stack.cid("topics"))["ExitCode"] == 0, stack.run("logs", "topics").stdout
        for svc in ("kafka", "redis"):
            _wait(f"{svc} healthy", functools.partial(stack.healthy, svc), 120)
        _wait("prometheus ready", lambda: _http_ok(f"{stack.prometheus}/-/ready"), 60)

        # From the host, through the advertised EXTERNAL listener: topics exist
        # already, so this is also the idempotency check of `tickscale topics`.
        bootstrap = f"127.0.0.1:{stack.kafka_port}"
        r2 = subprocess.run(
            [sys.executable, "-m", "tickscale", "topics", "--bootstrap", bootstrap],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=stack.client_env("admin"),
        )
        assert r2.returncode == 0, r2.stdout + r2.stderr
        ok = True
    finally:
        if not ok:
            print(stack.logs())
        stack.run("down", "-v", "--remove-orphans", timeout=180)


# A short replay across the open, fast: the scaler runs one handler (minimum)
# until the replay publishes its clock, raises the fleet to the open's floor
# (capped at the maximum), and once the replay ends and its clock goes stale,
# scales down after the (short) scale-down window.
E2E_MAX_HANDLERS = 3
E2E_SETTINGS = {
    "REPLAY_SYMBOLS": "20",
    "REPLAY_SPEED": "20",
    "REPLAY_FROM": "09:25",
    "REPLAY_TO": "09:45",
    "REPLAY_MALFORMED_EVERY": "500",
    "SCALER_MIN_HANDLERS": "1",
    "SCALER_MAX_HANDLERS": str(E2E_MAX_HANDLERS),
    "SCALER_SESSION_MIN": f"pre_market=1,open={E2E_MAX_HANDLERS},close={E2E_MAX_HANDLERS}",
    "SCALER_SCALE_DOWN_WINDOW_S": "20",
}
# Run as a stack service (its principal): reads md.raw's partitions, then tries
# to write a record into md.raw, which only User:replay may do.
FORGE_RAW = """
import asyncio, sys
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import TopicAuthorizationFailedError
from core.secrets import kafka_auth

async def main():
    auth = kafka_auth()
    c = AIOKafkaConsumer("md.raw", bootstrap_servers="kafka:9092", group_id=None, **auth)
    await c.start()
    parts = c.partitions_for_topic("md.raw")
    await c.stop()
    if not parts:
        print("md.raw not readable")
        return 1
    p = AIOKafkaProducer(bootstrap_servers="kafka:9092", **auth)
    await p.start()
    try:
        await p.send_and_wait("md.raw", b"forged")
    except TopicAuthorizationFailedError:
        print(f"as {auth['sasl_plain_username']}: md.raw readable, write refused")
        return 0
    finally:
        await p.stop()
    print("written", parts)
    return 1

sys.exit(asyncio.run(main()))
"""
# The stack's password files the handler tasks get as swarm secrets (compose/swarm.yml).
SWARM_HANDLER_SECRETS = ("redis_password", "kafka_handler_password")
LEDGER_OK = "missing=0 duplicated=0 reordered=0 checksum_mismatch=0"


def _assert_compose_ledger(stack: ComposeStack, replay: str, tmp_path: Path) -> None:
    """Every tick exactly once and every dead letter accounted for: checked from the host
    through the published EXTERNAL listener, against the manifest in the replay's volume."""
    manifest, report = tmp_path / "manifest.json", tmp_path / "verify.json"
    docker("cp", f"{replay}:/data/manifest.json", str(manifest))
    v = subprocess.run(
        [
            sys.executable, "-m", "tickscale", "verify",
            "--bootstrap", f"127.0.0.1:{stack.kafka_port}",
            "--manifest", str(manifest),
            "--timeout", "120",
            "--json", str(report),
        ],
        capture_output=True, text=True, timeout=300, check=False,
        env=stack.client_env("verify"),
    )  # fmt: skip
    print(v.stdout[-1500:])
    lines = v.stdout.strip().splitlines()
    assert lines and lines[-1] == LEDGER_OK, v.stdout[-3000:] + v.stderr[-3000:]
    assert v.returncode == 0, v.stdout[-3000:] + v.stderr[-3000:]
    ledger = json.loads(report.read_text())
    assert ledger["ticks_read"] == ledger["ticks_expected"] > 0, ledger
    assert ledger["deadletters"] == ledger["deadletters_expected"] > 0, ledger


def _series(url: str, promql: str, start: float) -> list[dict]:
    return run_query(url, promql, start=start, end=time.time(), step=2.0)["result"]


def _dashboard_failures(url: str, start: float, within_s: float) -> list[Failure]:
    """Every dashboard query over the run, retried while scrapes catch up; those of
    events the run does not make (a rollout) only have to run without error."""
    every = [q for name, d in load_dashboards().items() for q in extract_queries(name, d)]
    queries = [q for q in every if (q.dashboard, q.where) not in EVENT_ONLY]
    for q in every:
        if (q.dashboard, q.where) in EVENT_ONLY:
            run_query(url, q.promql, start=start, end=time.time(), step=2.0)
    assert queries, "no dashboard queries found"
    deadline = time.monotonic() + within_s
    while True:
        failures = check_queries(url, queries, start=start, end=time.time(), step=2.0)
        if not failures or time.monotonic() > deadline:
            return failures
        time.sleep(3)


@pytest.mark.slow
def test_compose_stack_scales_handlers_end_to_end(image: dict, tmp_path: Path) -> None:
    """The whole stack as users start it (Grafana aside): the scaler starts handler
    containers through the Docker gate, scales up for the replayed open and
    down after it, every tick arrives exactly once (verified from the host),
    Prometheus finds the handlers through Docker and every dashboard query has
    data, and `down` leaves neither handler containers nor the network behind."""
    fleet = f"e2e{uuid.uuid4().hex[:8]}"
    stack = _compose_stack(tmp_path, SCALER_NAME=fleet, **E2E_SETTINGS)
    t0 = time.time()
    counts: list[int] = []  # running handler containers, one sample a second
    took: dict[str, float] = {}  # seconds per phase, for the log
    mark = time.monotonic()

    def done(phase: str) -> None:
        nonlocal mark
        took[phase] = round(time.monotonic() - mark, 1)
        mark = time.monotonic()

    def handlers_now() -> int:
        counts.append(len(_handlers(fleet)))
        return counts[-1]

    ok = down_ran = False
    pre_down_logs = ""
    try:
        # Compose itself orders the start: topics once Kafka is healthy, the
        # scaler after topics and Redis, the replay once the scaler is healthy.
        services = stack.run("config", "--services").stdout.split()
        assert {"kafka", "redis", "scaler", "replay", "prometheus", "grafana"} <= set(services)
        r = stack.run("up", "-d", *(s for s in services if s not in NOT_HERE | TOOLS), timeout=420)
        assert r.returncode == 0, r.stdout + r.stderr
        done("up")
        replay = stack.cid("replay")
        assert replay, stack.run("ps").stdout

        def replay_done() -> bool:
            handlers_now()
            return _state(replay)["Status"] == "exited"

        # 20 market minutes at 20x: about a minute, plus the start-up snapshot.
        _wait("the replay to finish", replay_done, 300)
        done("replay")
        assert _state(replay)["ExitCode"] == 0, stack.logs(fleet)
        peak = max(counts)
        assert peak == E2E_MAX_HANDLERS, f"handler containers seen during the replay: {counts}"

        def all_healthy() -> bool:
            try:
                states = [_state(c).get("Health", {}).get("Status") for c in _handlers(fleet)]
            except subprocess.CalledProcessError:
                return False  # one went between listing and inspecting: ask again
            return bool(states) and set(states) == {"healthy"}

        # The image's HEALTHCHECK, in the containers the scaler started.
        _wait("the handler containers to report healthy", all_healthy, 90)

        _assert_compose_ledger(stack, replay, tmp_path)
        done("verify")
        # The same check inside the stack, as a user without a host virtualenv runs it.
        v = stack.run("run", "--rm", "verify", timeout=420)
        assert v.returncode == 0, v.stdout[-3000:] + v.stderr[-3000:]
        assert v.stdout.strip().splitlines()[-1] == LEDGER_OK, v.stdout[-3000:]
        done("verify in the stack")
        # Inside the stack, User:verify reads md.raw but may not write a record into it.
        probe = stack.run(
            "run", "--rm", "--entrypoint", "python3", "verify", "-c", FORGE_RAW, timeout=180
        )
        assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
        assert "as verify: md.raw readable, write refused" in probe.stdout, probe.stdout

        # No replay clock, no load: handlers go once the window has passed.
        _wait("the scaler to remove handlers after the replay", lambda: handlers_now() < peak, 180)
        done("scale-down")

        url = stack.prometheus
        assert _series(url, 'up{job="scaler"} == 1', t0), "Prometheus never scraped the scaler"
        scraped = {
            s["metric"].get("container")
            for s in _series(url, f'up{{job="handler", container=~".*-{fleet}-.*"}} == 1', t0)
        }
        # Each handler container the scaler started is its own target, found through Docker.
        assert len(scraped) >= peak, f"handler containers scraped: {sorted(map(str, scraped))}"
        assert _series(url, 'tickscale_scaler_session{session="open"} == 1', t0), (
            "the scaler never saw the replayed open"
        )
        failures = _dashboard_failures(url, t0, within_s=90)
        assert not failures, "\n".join(map(str, failures))
        done("dashboards")

        # A load test against this stack's Kafka and Redis, as a user would point one at it:
        # its own topics, scaler and handlers on the host, the same ledger.
        res = tmp_path / "loadtest.json"
        lt = subprocess.run(
            [
                sys.executable, "-m", "tickscale", "loadtest", "--no-progress",
                "--target", "compose", "--compose-env", str(stack.env_file),
                "--scenario", "open", "--from", "09:30", "--to", "09:32", "--speed", "20",
                "--symbols", "10", "--partitions", "2", "--policy", "fixed:1",
                "--out", str(tmp_path / "loadtest"), "--json", str(res),
            ],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert lt.returncode == 0, lt.stderr[-4000:]
        lr = json.loads(res.read_text())
        assert lr["target"] == "compose" and lr["ledger_ok"] and lr["slo_ok"], lr
        assert lr["ticks_read"] == lr["ticks_expected"] > 0, lr
        done("loadtest")

        pre_down_logs = stack.logs(fleet)
        # As a user stops it: the scaler (TICKSCALE_SCALER_STOP_HANDLERS_ON_EXIT)
        # drains and removes its handlers, so the network can go too. Its own
        # account of that is gone with its container unless followed now.
        scaler_log = tmp_path / "scaler-stop.log"
        with scaler_log.open("wb") as f:
            assert DOCKER is not None
            follow = subprocess.Popen(
                [DOCKER, "logs", "-f", "--since", "1s", stack.cid("scaler")], stdout=f, stderr=f
            )
            down_ran = True
            try:
                r = stack.run("down", "-v", "--remove-orphans", timeout=240)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    follow.wait(timeout=30)  # ends with the container
            finally:
                if follow.poll() is None:
                    follow.kill()
                    follow.wait()
        stopping = f"{r.stdout}{r.stderr}\n--- scaler\n{scaler_log.read_text(errors='replace')}"
        assert r.returncode == 0, stopping
        done("down")
        left = _handlers(fleet, all_states=True)
        assert not left, f"handler containers left after down: {left}\n{stopping}"
        net = docker("network", "inspect", stack.network, check=False)
        assert net.returncode != 0, f"network {stack.network} left after down\n{stopping}"
        # Drained, not killed: each handler committed and left while Kafka was up.
        exits = re.findall(r"stopped handler container \S+ \(exit (\S+)\)", stopping)
        assert exits and set(exits) == {"0"}, stopping
        print(stopping[-3000:])
        ok = True
    finally:
        # Shown by pytest on failure (or with -rP): the fleet's size over the run.
        print(f"handler containers, one sample a second: {counts}")
        print(f"seconds per phase: {took}")
        if not ok:
            print(pre_down_logs or stack.logs(fleet))
        if not down_ran:
            stack.run("down", "-v", "--remove-orphans", timeout=240)
        # Whatever happened above: nothing of this run may stay on the engine.
        left = _handlers(fleet, all_states=True)
        if left:
            docker("rm", "-f", *left, check=False)
        if docker("network", "inspect", stack.network, check=False).returncode == 0:
            stack.run("down", "-v", "--remove-orphans", timeout=240)


@pytest.mark.slow
def test_compose_swarm_variant_scales_a_service(image: dict, tmp_path: Path, swarm: None) -> None:
    """compose/swarm.yml on a one-node swarm: the scaler grows a Swarm service for the
    replayed open, every tick arrives exactly once, Prometheus scrapes each task, and
    `down` leaves neither the service nor the overlay network behind."""
    fleet = f"sw{uuid.uuid4().hex[:8]}"
    service = f"tickscale-handlers-{fleet}"
    stack = _compose_stack(
        tmp_path, "swarm.yml", SCALER_NAME=fleet, SWARM_SERVICE=service,
        SWARM_SECRET_PREFIX=fleet, **E2E_SETTINGS,
    )  # fmt: skip
    # The handlers' swarm secrets, made from the stack's files as compose/swarm.yml says.
    swarm_secrets = [f"{fleet}-{n.replace('_', '-')}" for n in SWARM_HANDLER_SECRETS]
    for name, file in zip(swarm_secrets, SWARM_HANDLER_SECRETS, strict=True):
        docker("secret", "create", name, str(stack.secrets_dir / file))
    t0 = time.time()
    counts: list[int] = []  # running task containers, one sample a second

    def tasks_now() -> int:
        r = docker(
            "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}",
            "--filter", "status=running",
        )  # fmt: skip
        counts.append(len(r.stdout.split()))
        return counts[-1]

    down_ran = False
    try:
        services = stack.run("config", "--services").stdout.split()
        r = stack.run("up", "-d", *(s for s in services if s not in NOT_HERE | TOOLS), timeout=420)
        assert r.returncode == 0, r.stdout + r.stderr
        replay = stack.cid("replay")
        assert replay, stack.run("ps").stdout

        def replay_done() -> bool:
            tasks_now()
            return _state(replay)["Status"] == "exited"

        _wait("the replay to finish", replay_done, 300)
        assert _state(replay)["ExitCode"] == 0, stack.logs()
        assert max(counts) == E2E_MAX_HANDLERS, f"running tasks seen during the replay: {counts}"
        spec = json.loads(docker("service", "inspect", service).stdout)[0]["Spec"]
        assert spec["Labels"][LABEL_SCALER] == fleet, spec
        _assert_compose_ledger(stack, replay, tmp_path)

        # The tasks are found through Docker like the containers of the docker backend.
        up = _series(stack.prometheus, f'up{{job="handler", container=~"{service}[.].*"}} == 1', t0)
        scraped = {s["metric"]["container"] for s in up}
        assert len(scraped) >= E2E_MAX_HANDLERS, f"tasks scraped: {sorted(scraped)}"

        down_ran = True
        r = stack.run("down", "-v", "--remove-orphans", timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        # The scaler drained the tasks and removed the service, which held the network.
        assert docker("service", "inspect", service, check=False).returncode != 0
        assert tasks_now() == 0
        assert docker("network", "inspect", stack.network, check=False).returncode != 0
    finally:
        print(f"running tasks, one sample a second: {counts}")
        if not down_ran:
            print(stack.logs())
            stack.run("down", "-v", "--remove-orphans", timeout=240)
        docker("service", "rm", service, check=False)
        docker("secret", "rm", *swarm_secrets, check=False)
        if docker("network", "inspect", stack.network, check=False).returncode == 0:
            time.sleep(5)  # the service's tasks release the network as they go
            docker("network", "rm", stack.network, check=False)
