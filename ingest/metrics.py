"""Prometheus metrics of the feed handler, declared once with their help text.

Names are part of the project's interface: dashboards, the scaler and the load
tests query them, so they change only with those.
"""

from __future__ import annotations

import orjson
from prometheus_client import Counter, Gauge, Histogram

# Finer between 50 and 250 ms, where the latency goals sit: quantiles are
# interpolated inside a bucket, and 0.1 -> 0.25 alone blurred p99 by up to 150 ms.
_LAT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25,
    0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip

MESSAGES_IN = Counter(
    "tickscale_handler_messages_in_total", "Raw messages consumed from md.raw", ["partition"]
)
TICKS_OUT = Counter("tickscale_handler_ticks_out_total", "Ticks committed to md.ticks", ["kind"])
DEADLETTERS = Counter(
    "tickscale_handler_deadletters_total", "Raw messages sent to md.deadletter", ["reason"]
)
DECODE_ERRORS = Counter(
    "tickscale_handler_decode_errors_total",
    "Raw messages that failed to decode",
    ["codec", "reason"],
)
BOOK_ERRORS = Counter(
    "tickscale_handler_book_errors_total",
    "Order events inconsistent with the book (unknown order, over-fill)",
    ["reason"],
)
SEQUENCE_GAPS = Counter(
    "tickscale_handler_sequence_gaps_total", "Feed messages missing by sequence number"
)
RAW_DELETED = Counter(
    "tickscale_handler_raw_records_deleted_total",
    "Raw records deleted from md.raw (retention, or by hand) before the handler used them: "
    "before_processing (their ticks are missing), before_restore (a rebuilt book lacks them)",
    ["when"],
)
for _when in ("before_processing", "before_restore"):
    RAW_DELETED.labels(_when)  # exported at 0, so a panel or an alert sees the series at once
BATCH_SIZE = Histogram(
    "tickscale_handler_batch_size",
    "Raw messages per transaction",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
PROCESSING = Histogram(
    "tickscale_handler_processing_seconds",
    "Time to decode, normalise and commit one batch",
    buckets=_LAT_BUCKETS,
)
E2E_LATENCY = Histogram(
    "tickscale_handler_e2e_latency_seconds",
    "From the raw record's broker timestamp to the commit of its ticks",
    buckets=_LAT_BUCKETS,
)
PARTITION_LAG = Gauge(
    "tickscale_handler_partition_lag",
    "Messages behind the high watermark, per assigned partition",
    ["partition"],
)
ASSIGNED = Gauge("tickscale_handler_assigned_partitions", "Partitions currently owned")
REBALANCES = Counter("tickscale_handler_rebalances_total", "Partition assignments received")
RESTORE = Histogram(
    "tickscale_handler_restore_seconds",
    "Time to restore a partition's books (snapshot load and replay)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
RESTORE_REPLAYED = Counter(
    "tickscale_handler_restore_replayed_total", "Raw messages replayed silently while restoring"
)
TXN_ABORTS = Counter(
    "tickscale_handler_transaction_aborts_total", "Transactions aborted and retried", ["reason"]
)
PRODUCE_RETRIES = Counter(
    "tickscale_handler_produce_retries_total",
    "Produce requests the producer retried, by the broker's error",
    ["error"],
)
# The routine one with transactions (retry_log.py): exported from the start, at zero
# until it happens, so a dashboard shows a quiet handler as quiet, not as missing.
PRODUCE_RETRIES.labels("NotEnoughReplicasError")
STALE_TXN_FENCED = Counter(
    "tickscale_handler_stale_transactions_fenced_total",
    "Previous owners' transactions fenced after outlasting fence_after_s on a new assignment",
)
REDIS_ERRORS = Counter(
    "tickscale_handler_redis_errors_total", "Failed Redis writes (snapshots, last-tick cache)"
)
BUSY = Counter(
    "tickscale_handler_busy_seconds_total", "Seconds spent processing batches (capacity estimate)"
)
INFO = Gauge(
    "tickscale_handler_info",
    "Always 1; the version label names what this handler runs",
    ["version"],
)


def _total(metric: Counter | Gauge, suffix: str = "") -> float:
    return sum(s.value for m in metric.collect() for s in m.samples if s.name == m.name + suffix)


def guard_figures() -> dict[str, str | float]:
    """What a rollout's guard compares, cumulative since start, for the handler's stats hash
    in Redis (the scaler reads those rather than every handler's /metrics)."""
    buckets = [
        s.value
        for m in E2E_LATENCY.collect()
        for s in m.samples
        if s.name.endswith("_bucket")  # cumulative, +Inf (the total) last
    ]
    return {
        "records": _total(MESSAGES_IN, "_total"),
        "deadletters": _total(DEADLETTERS, "_total"),
        "decode_errors": _total(DECODE_ERRORS, "_total"),
        "lag": _total(PARTITION_LAG),
        "assigned": _total(ASSIGNED),
        "e2e_buckets": orjson.dumps(buckets).decode(),
    }
