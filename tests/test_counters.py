"""The fleet's totals in the load test's live view, from real /metrics text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

from tickscale.loadtest.counters import FleetCounter, counter_value


def _metrics(ticks: dict[str, float]) -> str:
    reg = CollectorRegistry()
    c = Counter("tickscale_handler_ticks_out", "ticks", ["kind"], registry=reg)
    for kind, v in ticks.items():
        c.labels(kind).inc(v)
    return generate_latest(reg).decode()


def test_a_counter_is_summed_over_its_labels() -> None:
    text = _metrics({"trade": 5, "quote": 7})
    assert counter_value(text, "tickscale_handler_ticks_out") == 12
    assert counter_value(text, "tickscale_handler_deadletters") is None


def test_the_fleet_total_keeps_what_stopped_and_restarted_handlers_counted() -> None:
    fc = FleetCounter("tickscale_handler_ticks_out")
    fc.update("h0", _metrics({"trade": 10}))
    fc.update("h1", _metrics({"trade": 4}))
    fc.update("h0", _metrics({"trade": 15}))
    assert fc.total == 19
    # h1 is scaled in (no more scrapes); h0's process is replaced and counts from zero.
    fc.update("h0", _metrics({"trade": 2}))
    assert fc.total == 15 + 4 + 2
