"""End-to-end latency from the handlers' own histograms, merged across every handler of a run.

Which latency, and why this source: ``tickscale_handler_e2e_latency_seconds`` spans from the
raw record's timestamp on ``md.raw`` (when the feed published it) to the commit of the
transaction that carries its ticks, i.e. the moment a ``read_committed`` consumer can see them.
That is the delay a market-data user experiences, including the wait in ``md.raw`` when the
fleet falls behind. The ticks themselves cannot give it: they carry ``recv_ts`` (when the
handler picked the raw record up, so the queueing in ``md.raw``, the part that grows under
load, is left out) and the exchange's ``event_ts`` (market time of a replayed day, not wall
time); joining ticks back to raw records would mean reading both topics again after the run.

Costs of this source, stated rather than hidden:

- percentiles are bucketed: interpolated inside the bucket as Prometheus's
  ``histogram_quantile`` does, so they are exact only at bucket bounds (between 10 s and 30 s
  the interpolation can be off by many seconds); one that falls above the last finite bound
  (30 s) is infinite, never the bound itself;
- the maximum is the upper bound of the highest non-empty bucket (the handlers do not record an
  exact maximum); above the last finite bound (30 s) it is reported as infinite;
- every eighth record of a batch is observed (the handler's sampling);
- a handler killed between two scrapes (one second apart) takes its last second with it.

Handlers come and go (scaling, crashes); each is scraped once a second and its last counts are
kept after it disappears, so the run's histogram is the sum over every handler that lived.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re

METRIC = "tickscale_handler_e2e_latency_seconds"
_BUCKET = re.compile(rf'^{METRIC}_bucket\{{(?:[^}}]*,)?le="([^"]+)"[^}}]*\}} (\S+)$', re.M)


def parse_buckets(text: str) -> dict[float, float]:
    """Cumulative bucket counts ``{upper bound: count}`` of the e2e histogram in /metrics text."""
    out: dict[float, float] = {}
    for le, v in _BUCKET.findall(text):
        b = math.inf if le == "+Inf" else float(le)
        out[b] = out.get(b, 0.0) + float(v)
    return out


class Histogram:
    """Cumulative bucket counts over fixed upper bounds (the last is +Inf)."""

    def __init__(self, bounds: list[float], counts: list[float] | None = None) -> None:
        self.bounds = bounds
        self.counts = counts if counts is not None else [0.0] * len(bounds)

    @classmethod
    def from_buckets(cls, buckets: dict[float, float]) -> Histogram:
        bounds = sorted(buckets)
        return cls(bounds, [buckets[b] for b in bounds])

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def __add__(self, other: Histogram) -> Histogram:
        if not self.bounds:
            return Histogram(list(other.bounds), list(other.counts))
        if not other.bounds:
            return Histogram(list(self.bounds), list(self.counts))
        if self.bounds != other.bounds:
            raise ValueError("histograms with different buckets")
        return Histogram(
            self.bounds, [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        )

    def __sub__(self, other: Histogram) -> Histogram:
        if not other.bounds:
            return Histogram(list(self.bounds), list(self.counts))
        if self.bounds != other.bounds:
            raise ValueError("histograms with different buckets")
        diff = [max(0.0, a - b) for a, b in zip(self.counts, other.counts, strict=True)]
        return Histogram(self.bounds, diff)

    def quantile(self, q: float) -> float | None:
        """``histogram_quantile(q)``: linear inside the bucket; None without observations."""
        total = self.count
        if total <= 0:
            return None
        rank = q * total
        prev_bound, prev_count = 0.0, 0.0
        for b, c in zip(self.bounds, self.counts, strict=True):
            if c >= rank:
                if math.isinf(b):
                    # Above the last finite bound all that is known is "more than that";
                    # Prometheus would answer the bound itself, which would pass a check
                    # the true value fails.
                    return math.inf
                if c == prev_count:
                    return b
                return prev_bound + (b - prev_bound) * (rank - prev_count) / (c - prev_count)
            prev_bound, prev_count = b, c
        return prev_bound

    def max_bound(self) -> float | None:
        """Upper bound of the highest non-empty bucket (an upper bound of the true maximum)."""
        prev = 0.0
        top = None
        for b, c in zip(self.bounds, self.counts, strict=True):
            if c > prev:
                top = b
            prev = c
        return top


class FleetLatency:
    """The run's histogram: every handler's last scrape, including handlers now gone."""

    def __init__(self) -> None:
        self._live: dict[str, Histogram] = {}
        self._retired = Histogram([])

    def update(self, handler: str, h: Histogram) -> None:
        last = self._live.get(handler)
        if last is not None and h.count < last.count:
            # Same name, counts went back: a new process. Keep what the old one recorded.
            self._retired = self._retired + last
        self._live[handler] = h

    def total(self) -> Histogram:
        out = self._retired
        for h in self._live.values():
            out = out + h
        return out


async def http_get(host: str, port: int, path: str, limit_s: float = 2.0) -> str:
    """GET over a raw connection: the handlers' endpoint closes after each response."""

    async def go() -> str:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise OSError(f"{host}:{port}{path}: {head[:40]!r}")
        return body.decode(errors="replace")

    return await asyncio.wait_for(go(), limit_s)
