"""A throwaway Prometheus (the Debian ``prometheus`` binary) scraping given targets."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tickscale.localstack import proc as _proc
from tickscale.localstack.net import HOST, free_port


class PrometheusServer:
    """Prometheus on 127.0.0.1 with a short scrape interval and its own TSDB dir.

    Targets live in a file_sd JSON file rather than static_configs, so
    ``set_targets`` can change them without a restart or a reload call:
    Prometheus watches the file.
    """

    def __init__(
        self,
        targets: Sequence[str] = (),
        scrape_interval: str = "1s",
        job: str = "tickscale",
        port: int = 0,
        host: str = HOST,
        work_dir: Path | None = None,
        binary: str | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.job = job
        self.scrape_interval = scrape_interval
        self._targets = list(targets)
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="tickscale-prometheus-"))
        self.binary = binary or shutil.which("prometheus") or "/usr/bin/prometheus"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "prometheus.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def _sd_path(self) -> Path:
        return self.work_dir / "targets.json"

    def set_targets(self, targets: Sequence[str]) -> None:
        self._targets = list(targets)
        # Write-then-rename so Prometheus never reads a half-written file.
        tmp = self._sd_path.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": self._targets, "labels": {}}]))
        tmp.replace(self._sd_path)

    def _write_config(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.set_targets(self._targets)
        cfg = self.work_dir / "prometheus.yml"
        # JSON is valid YAML, which saves a dependency on a YAML writer.
        cfg.write_text(
            json.dumps(
                {
                    "global": {
                        "scrape_interval": self.scrape_interval,
                        "evaluation_interval": self.scrape_interval,
                        "scrape_timeout": self.scrape_interval,
                    },
                    "scrape_configs": [
                        {
                            "job_name": self.job,
                            "file_sd_configs": [
                                {"files": [str(self._sd_path)], "refresh_interval": "1s"}
                            ],
                        }
                    ],
                },
                indent=2,
            )
        )
        return cfg

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        if self.running:
            return self
        if not Path(self.binary).exists():
            raise RuntimeError("prometheus not found: apt-get install prometheus")
        cfg = self._write_config()
        cmd = [
            self.binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={self.work_dir / 'data'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        self._proc = _proc.spawn(cmd, self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"prometheus on {self.url} not ready; see {self.log_path}\n{_proc.tail(self.log_path)}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        _proc.stop(self._proc, timeout=timeout)
        self._proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def query(self, promql: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Instant query; returns ``data.result`` (a list of {metric, value} dicts)."""
        qs = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{qs}", timeout=timeout) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query {promql!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(
        self, promql: str, timeout: float = 30.0, interval: float = 0.5
    ) -> list[dict[str, Any]]:
        """Poll ``promql`` until it returns a non-empty result (scrapes are asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if result or time.monotonic() >= deadline:
                if not result:
                    raise TimeoutError(f"{promql!r} still empty after {timeout:.0f}s")
                return result
            time.sleep(interval)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
