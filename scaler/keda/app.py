"""``tickscale scaler keda`` assembled: the scaler's loop over a reported count, and the
gRPC server KEDA calls.

The loop is the scaler's own (``scaler.app.build``): the same probe, learned capacity,
market clock, policy, lease, audit trail and /metrics; only its backend differs
(``ReportedReplicas``). Only the lease holder's decisions change the reported count, so
run one replica of this process; a second (a rolling update's overlap) reports the fleet
it adopted until it leads.
"""

from __future__ import annotations

import logging
import socket

import grpc

from scaler.app import StartupError, build
from scaler.keda import externalscaler_pb2_grpc as pb_grpc
from scaler.keda.grpc_service import ExternalScaler
from scaler.keda.replicas import ReportedReplicas
from scaler.keda.settings import KedaSettings, check_listen
from scaler.service import Scaler

log = logging.getLogger("scaler.keda")

# In-flight calls get this long to finish on shutdown; streams are ended at once.
STOP_GRACE_S = 5.0


def bind_error(listen: str) -> str | None:
    """Why ``listen`` cannot be bound, as the OS says it (None if it can be now)."""
    host, port = check_listen(listen)
    try:
        with socket.create_server((host.strip("[]"), port)):
            return None
    except OSError as e:
        return e.strerror or str(e)


class KedaScaler:
    """The scaler and its gRPC server; ``async with`` starts and stops both.

    Calls fail UNAVAILABLE while the last good poll is older than the scaler's
    ``stale_s``, the age at which its /readyz turns false too.
    """

    def __init__(self, s: KedaSettings, scaler: Scaler, replicas: ReportedReplicas) -> None:
        self.settings = s
        self.scaler = scaler
        self.replicas = replicas
        self.service = ExternalScaler(scaler, replicas, s.activation_lag, scaler.stale_s)
        self._server: grpc.aio.Server | None = None
        self.port = 0  # the port bound (--listen HOST:0 picks one)

    async def start(self) -> None:
        """Listen, then start the scaler; StartupError("listen", ...) if the address cannot
        be bound."""
        # No SO_REUSEPORT (grpc's default): a second scaler on a taken port must fail,
        # not share it and answer half of KEDA's calls from another fleet's figures.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ExternalScalerServicer_to_server(self.service, server)
        try:
            self.port = server.add_insecure_port(self.settings.listen)
        except RuntimeError as e:  # grpc's "Failed to bind to address ...", without the cause
            why = bind_error(self.settings.listen) or str(e).split(";")[0]
            raise StartupError("listen", f"cannot listen on {self.settings.listen}: {why}") from e
        await server.start()
        self._server = server
        await self.scaler.start()
        log.info("KEDA external scaler listening on %s (port %d)", self.settings.listen,
                 self.port)  # fmt: skip

    async def stop(self) -> None:
        self.service.closing.set()
        if self._server is not None:
            await self._server.stop(STOP_GRACE_S)
            self._server = None
        await self.scaler.stop()

    async def __aenter__(self) -> KedaScaler:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run(self) -> None:
        """Poll until stopped (``scaler.request_stop``, or a signal once installed)."""
        await self.scaler.run()


async def build_keda(s: KedaSettings) -> KedaScaler:
    """A ready-to-start KedaScaler; raises StartupError naming what is wrong."""
    replicas = ReportedReplicas()
    scaler = await build(s, backend=replicas)
    scaler.stop_handlers_on_exit = False  # the HPA owns the pods

    async def members() -> int:
        return (await scaler.probe.group_info()).members

    replicas.members = members
    return KedaScaler(s, scaler, replicas)
