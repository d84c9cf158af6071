"""Prometheus metrics of the scaler, declared once with their help text.

Names are part of the project's interface: the Grafana dashboards and the load
tests query them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DESIRED = Gauge("tickscale_scaler_desired_handlers", "Handler count the scaler wants now")
TARGET = Gauge(
    "tickscale_scaler_target_handlers",
    "Handler count the signals ask for, before stabilisation and step limits",
)
RUNNING = Gauge("tickscale_scaler_running_handlers", "Handlers the backend reports running")
MEMBERS = Gauge("tickscale_scaler_group_members", "Members of the handler consumer group")
PROPOSAL = Gauge(
    "tickscale_scaler_signal_proposal_handlers", "Handler count each signal proposes", ["signal"]
)
LAG_MSGS = Gauge("tickscale_scaler_lag_messages", "Total lag of the handler group on md.raw")
PARTITION_LAG = Gauge(
    "tickscale_scaler_partition_lag_messages", "Lag per partition of md.raw", ["partition"]
)
LAG_SECONDS = Gauge(
    "tickscale_scaler_lag_seconds", "Age of the oldest unprocessed message on md.raw"
)
INGEST_RATE = Gauge("tickscale_scaler_ingest_rate", "Messages per second into md.raw (smoothed)")
PROCESS_RATE = Gauge(
    "tickscale_scaler_process_rate", "Messages per second the group commits (smoothed)"
)
CAPACITY = Gauge(
    "tickscale_scaler_handler_capacity", "Messages per second one handler sustains (learned)"
)
PARTITIONS = Gauge("tickscale_scaler_partitions", "Partitions of md.raw")
SESSION = Gauge(
    "tickscale_scaler_session", "1 for the trading session in force, 0 for the others", ["session"]
)
DECISIONS = Counter(
    "tickscale_scaler_decisions_total", "Scaling decisions by winning signal and action",
    ["reason", "action"],
)  # fmt: skip
SCALE_EVENTS = Counter(
    "tickscale_scaler_scale_events_total", "Handler count changes made", ["reason", "direction"]
)
ROLLOUT_EVENTS = Counter(
    "tickscale_scaler_rollout_events_total", "Handler rollout steps, by event", ["event"]
)
# Each at 0 from the start: a step's first increment must show as an increase (the
# dashboards' rollout annotation), which a series born at 1 would not.
for _event in (
    "canary",
    "window",
    "passed",
    "step",
    "promoted",
    "rolling_back",
    "rolled_back",
    "rejected",
):
    ROLLOUT_EVENTS.labels(_event)
BACKEND_ERRORS = Counter(
    "tickscale_scaler_backend_errors_total", "Backend calls that failed", ["op"]
)
POLL_FAILURES = Counter(
    "tickscale_scaler_poll_failures_total",
    "Polls that could not measure, decide or act (the fleet is held meanwhile)",
)
LAST_GOOD_POLL = Gauge(
    "tickscale_scaler_last_good_poll_timestamp_seconds",
    "When a poll last measured the group; the other gauges are that poll's figures",
)
LEADER = Gauge("tickscale_scaler_leader", "1 while this scaler holds the leader lease")
DRY_RUN = Gauge("tickscale_scaler_dry_run", "1 when the scaler decides but changes nothing")
POLL = Histogram(
    "tickscale_scaler_poll_seconds", "Time to measure, decide and act once",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)  # fmt: skip


def init_series() -> None:
    """Create every labelled counter's series at 0.

    A series born at 1 hides its first event from increase() and rate(); at 0
    from the start, the first backend error or scale event shows up.
    """
    for op in ("list", "add", "remove"):
        BACKEND_ERRORS.labels(op)
    for reason in ("lag", "rate", "session", "min"):
        for direction in ("up", "down"):
            SCALE_EVENTS.labels(reason, direction)
        for action in ("up", "down", "hold"):
            DECISIONS.labels(reason, action)
