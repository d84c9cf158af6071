"""The fleet's running totals of a handler counter, from each handler's /metrics.

A handler's counters start from zero in every process: one scaled in keeps the
total it reached, and one restarted under the same name adds to what its
previous process counted.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def counter_value(text: str, name: str) -> float | None:
    """The value of counter ``name`` (without ``_total``) in /metrics text, summed over
    its labels; None when the text has no such counter."""
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return sum(s.value for s in family.samples if s.name == name + "_total")
    return None


class FleetCounter:
    """One counter summed over every handler process seen during a run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._last: dict[str, float] = {}  # handler -> its current process's value
        self._before: dict[str, float] = {}  # handler -> what its earlier processes counted

    def update(self, handler: str, text: str) -> None:
        v = counter_value(text, self.name)
        if v is None:
            return
        last = self._last.get(handler, 0.0)
        if v < last:  # a new process under the same name: its count starts again
            self._before[handler] = self._before.get(handler, 0.0) + last
        self._last[handler] = v

    @property
    def total(self) -> int:
        return int(sum(self._last.values()) + sum(self._before.values()))
