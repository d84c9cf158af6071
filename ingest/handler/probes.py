"""The handler's health and readiness endpoint, and the metrics it serves."""

from __future__ import annotations

import logging

from core.http import HealthServer, PortInUse
from ingest.handler.settings import HandlerSettings

log = logging.getLogger(__name__)


class Probes:
    """Liveness (no fatal error) and readiness (started, joined, no fatal error)
    over HTTP, beside the Prometheus metrics."""

    def __init__(self, settings: HandlerSettings) -> None:
        self.s = settings
        self.started = False  # every client is open
        self.joined = False  # the group gave this member its partitions
        self.fatal: BaseException | None = None  # what made the handler give up
        self._http: HealthServer | None = None

    def healthy(self) -> bool:
        return self.fatal is None

    def ready(self) -> bool:
        return self.started and self.joined and self.fatal is None

    async def start(self) -> None:
        s = self.s
        self._http = HealthServer(s.metrics_host, s.metrics_port, self.healthy, self.ready)
        try:
            await self._http.start()
        except PortInUse:
            # A port given explicitly is someone's scrape target: never serve elsewhere.
            if "metrics_port" in s.model_fields_set:
                raise
            self._http = HealthServer(s.metrics_host, 0, self.healthy, self.ready)
            await self._http.start()
            log.warning(
                "handler %s: the default metrics port %d is in use; serving metrics on port "
                "%d instead (--metrics-port N chooses one)",
                s.handler_id,
                s.metrics_port,
                self._http.port,
            )
        log.info("handler %s: metrics on port %d", s.handler_id, self._http.port)

    async def stop(self) -> None:
        self.started = False
        if self._http is not None:
            await self._http.stop()
            self._http = None
