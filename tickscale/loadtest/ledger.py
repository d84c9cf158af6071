"""The no-loss ledger of a run: every tick out against the replay's manifest.

The check itself is ``ingest.verify`` (the one ``tickscale verify`` runs): per symbol, ticks
missing, duplicated, reordered, and a checksum over content and order; the dead-letter topic
counted against the dead letters the manifest expects. This module only runs it once the group
has drained and turns the result into the run's pass/fail line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.manifest import Manifest
from ingest.verify import VerifyResult, verify


@dataclass
class Ledger:
    ok: bool
    result: VerifyResult
    problems: dict[str, dict[str, int | bool]] = field(default_factory=dict)

    def line(self) -> str:
        r = self.result
        dl = (
            ""
            if r.deadletters is None
            else f" deadletters={r.deadletters}/{r.deadletters_expected}"
        )
        verdict = "PASS" if self.ok else "FAIL"
        return (
            f"ledger {verdict}: ticks={r.ticks_read:,}/{r.ticks_expected:,} {r.summary_line()} "
            f"unexpected_symbols={r.unexpected_symbols}{dl}"
            + (f" unreadable={r.unreadable}" if r.unreadable else "")
        )

    def as_dict(self) -> dict[str, Any]:
        d = self.result.to_dict()
        d["problems"] = dict(list(self.problems.items())[:50])
        return d


async def check(
    bootstrap: str, ticks_topic: str, deadletter_topic: str, manifest: Path, timeout_s: float
) -> Ledger:
    """Verify ``ticks_topic`` against ``manifest``; waits up to ``timeout_s`` for late ticks."""
    m = Manifest.read(manifest)
    res = await verify(bootstrap, ticks_topic, m, deadletter_topic, timeout_s=timeout_s)
    return Ledger(res.ok, res, res.per_symbol)
