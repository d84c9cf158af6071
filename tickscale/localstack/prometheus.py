"""A throwaway Prometheus (the Debian ``prometheus`` binary) scraping given targets."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tickscale.localstack.net import HOST
from tickscale.localstack.service import LocalService


class PrometheusServer(LocalService):
    """Prometheus on 127.0.0.1 with a short scrape interval and its own TSDB dir.

    Targets live in a file_sd JSON file rather than static_configs, so
    ``set_targets`` can change them without a restart or a reload call:
    Prometheus watches the file.
    """

    name = "prometheus"
    start_timeout = 30.0

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
        super().__init__(port, host, work_dir)
        self.job = job
        self.scrape_interval = scrape_interval
        self._targets = list(targets)
        self.binary = binary or shutil.which("prometheus") or "/usr/bin/prometheus"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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

    def _prepare(self) -> None:
        if not Path(self.binary).exists():
            raise RuntimeError("prometheus not found: apt-get install prometheus")

    def _command(self) -> list[str]:
        cfg = self._write_config()
        return [
            self.binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={self.work_dir / 'data'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

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
