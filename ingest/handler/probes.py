"""The handler's health and readiness endpoint, and the metrics it serves."""

from __future__ import annotations

import logging
import time

from core.http import HealthServer, PortInUse
from ingest.handler.settings import HandlerSettings

log = logging.getLogger(__name__)


class Probes:
    """Liveness (no fatal error) and readiness (started, joined, able to commit, no fatal
    error) over HTTP, beside the Prometheus metrics.

    A handler that cannot commit because a topic it writes to is gone stays alive (a
    restart would not bring the topic back, and it carries on by itself once the topic
    is there) but is not ready, so an orchestrator's readiness view shows the fleet
    cannot deliver."""

    def __init__(self, settings: HandlerSettings) -> None:
        self.s = settings
        self.started = False  # every client is open
        self.joined = False  # the group gave this member its partitions
        self.fatal: BaseException | None = None  # what made the handler give up
        self.blocked: str | None = None  # why commits cannot succeed now (a missing topic)
        self._blocked_until = 0.0  # monotonic; a mark not renewed by then has lapsed
        self._http: HealthServer | None = None

    def healthy(self) -> bool:
        return self.fatal is None

    def ready(self) -> bool:
        return self.started and self.joined and self.fatal is None and not self.is_blocked()

    def block(self, why: str, for_s: float) -> None:
        """Not ready for ``for_s``: each failed commit renews the mark, the topic's return
        lifts it (``unblock``), and a handler left with nothing to commit (its partitions
        gone to others) is ready again once it lapses, rather than for ever."""
        self.blocked = why
        self._blocked_until = time.monotonic() + for_s

    def unblock(self) -> None:
        self.blocked = None

    def is_blocked(self) -> bool:
        return self.blocked is not None and time.monotonic() < self._blocked_until

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
