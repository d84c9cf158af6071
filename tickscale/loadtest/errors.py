"""How a load test fails to run, as opposed to running and failing its checks."""

from __future__ import annotations


class RunError(RuntimeError):
    """The run could not be carried out (as opposed to: it ran and failed its checks)."""
