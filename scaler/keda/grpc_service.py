"""KEDA's ExternalScaler service, answered from the running scaler's last poll.

One metric, ``tickscale-handlers``, with target ``TARGET``: GetMetrics reports the
count the policy wants times ``TARGET``, so the HPA KEDA makes (metric type
AverageValue, KEDA's default) asks for ceil(value / TARGET) = that count. IsActive is
true while the group's lag exceeds ``activation_lag`` messages; KEDA uses it to scale
between zero and one replica, the HPA does the rest.

Nothing in the ScaledObjectRef is read: one ``tickscale scaler keda`` serves one
consumer group, the one its settings name; the ScaledObject's name and namespace only
appear in the log. A call before the first poll waits for it; while the last good poll
is older than ``stale_s`` (the broker unreachable) calls fail UNAVAILABLE, so KEDA
reports the error (and applies its fallback, if the ScaledObject has one) rather
than act on old figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from scaler.keda import externalscaler_pb2 as pb
from scaler.keda import externalscaler_pb2_grpc as pb_grpc
from scaler.keda.replicas import ReportedReplicas
from scaler.service import Scaler

log = logging.getLogger("scaler.keda")

METRIC = "tickscale-handlers"
TARGET = 1


@dataclass(frozen=True)
class Reading:
    """What the last poll says: the count to run and whether the group has lag."""

    handlers: int
    lag_msgs: int
    active: bool


class ExternalScaler(pb_grpc.ExternalScalerServicer):
    def __init__(
        self, scaler: Scaler, replicas: ReportedReplicas, activation_lag: int, stale_s: float
    ) -> None:
        self.scaler = scaler
        self.replicas = replicas
        self.activation_lag = activation_lag
        self.stale_s = stale_s
        self.closing = asyncio.Event()  # set on shutdown: open streams end cleanly

    def reading(self) -> Reading | None:
        """The last poll's figures; None before the first poll or once they are stale."""
        snap, count = self.scaler.snapshot, self.replicas.count
        if snap is None or count is None or time.time() - snap.time > self.stale_s:
            return None
        return Reading(count, snap.lag_msgs, snap.lag_msgs > self.activation_lag)

    async def _read(self, context: grpc.aio.ServicerContext) -> Reading:
        if not self.replicas.adopted.is_set():  # the first poll is under way
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.replicas.adopted.wait(), self.stale_s)
        r = self.reading()
        if r is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"no measurement of group {self.scaler.probe.group!r} in the last "
                f"{self.stale_s:.0f}s (is Kafka reachable?)",
            )
            raise AssertionError("abort returns by raising")  # for the type checker
        return r

    async def IsActive(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext
    ) -> pb.IsActiveResponse:
        r = await self._read(context)
        log.debug("IsActive %s/%s: %s (lag %d)", request.namespace, request.name, r.active,
                  r.lag_msgs)  # fmt: skip
        return pb.IsActiveResponse(result=r.active)

    async def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IsActiveResponse]:
        """The current value at once, then each change, checked every poll."""
        last: bool | None = None
        while not self.closing.is_set():
            r = await self._read(context)
            if r.active != last:
                last = r.active
                yield pb.IsActiveResponse(result=r.active)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), self.scaler.poll_s)

    async def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext
    ) -> pb.GetMetricSpecResponse:
        spec = pb.MetricSpec(metricName=METRIC, targetSize=TARGET, targetSizeFloat=TARGET)
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMetricsResponse:
        if request.metricName not in ("", METRIC):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown metric {request.metricName!r}; this scaler serves {METRIC!r}",
            )
        r = await self._read(context)
        ref = request.scaledObjectRef
        log.debug("GetMetrics %s/%s: %d handlers", ref.namespace, ref.name, r.handlers)
        value = r.handlers * TARGET
        return pb.GetMetricsResponse(
            metricValues=[
                pb.MetricValue(metricName=METRIC, metricValue=value, metricValueFloat=value)
            ]
        )
