"""The replay manifest: what was sent, and the ticks it must produce.

The replay feed runs the handler's own ``Normalizer`` over exactly the stream it
publishes, so the manifest states per symbol how many ticks a correct pipeline
emits and a checksum of their content in order. ``tickscale verify`` compares
``md.ticks`` against it.

A replay writes its manifest as it goes, each time after the broker has
acknowledged every record it counts: a replay that stops or fails part-way
leaves a manifest (``complete: false``) that is exact for what was sent, and
from which ``tickscale replay --resume`` carries on.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ingest.codecs.errors import DecodeError, SourceError
from ingest.normalize import Normalizer
from ingest.ticks import SymbolLedger

MANIFEST_VERSION = 1


class SymbolExpectation(BaseModel):
    messages: int = 0
    ticks: int = 0
    trades: int = 0
    quotes: int = 0
    checksum: str = ""


class Manifest(BaseModel):
    version: int = MANIFEST_VERSION
    source: str
    params: dict[str, Any] = Field(default_factory=dict)
    topic: str
    partitions: int
    records_sent: int = 0
    source_messages: int = 0
    deadletters_expected: int = 0
    deadletter_reasons: dict[str, int] = Field(default_factory=dict)
    book_errors: dict[str, int] = Field(default_factory=dict)
    pacing: dict[str, float] = Field(default_factory=dict)
    symbols: dict[str, SymbolExpectation] = Field(default_factory=dict)
    # False while the replay runs and when it stopped before the source's end.
    complete: bool = True
    # Records sent to each partition: the last feed sequence number (HDR_SEQ)
    # there, from which a resumed replay numbers on.
    partition_seqs: list[int] = Field(default_factory=list)
    # Wall time (ms since the epoch) of the acknowledgement the manifest counts up
    # to: a record sent later carries a later timestamp (its create or append
    # time), which is how a resumed replay finds what reached the broker after it.
    acked_at_ms: int = 0
    # The topic's id when the replay sent to it ("" where the broker gives none, or a
    # manifest from before ids were kept): a resume into a topic deleted and created again
    # since is refused, since what the earlier run sent is not in it.
    topic_id: str = ""
    # Each partition's log end when the replay first began (empty in manifests from
    # before they were kept): its records lie at or after these offsets, so a resume
    # never takes an earlier run's records, numbered from 1 as well, for its own.
    start_offsets: list[int] = Field(default_factory=list)

    def write(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_path(p)
        try:
            with tmp.open("w") as f:
                f.write(self.model_dump_json(indent=1))
                f.flush()
                # On disk before the rename: after a crash the manifest is the old
                # one or the new one, never an empty file.
                os.fsync(f.fileno())
            tmp.replace(p)  # atomic: a reader never sees half a manifest
        except OSError:
            tmp.unlink(missing_ok=True)  # half written (a full disk): ours, and of no use
            raise

    @staticmethod
    def check_writable(path: str | Path) -> None:
        """SourceError unless a manifest can be written at ``path`` (as ``write`` does),
        so a replay finds out before it publishes anything."""
        p = Path(path)
        where = str(p)
        if p.is_dir():
            raise SourceError(where, "is a directory, not a manifest file")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_path(p)
            with tmp.open("w"):
                pass
            tmp.unlink()
        except OSError as e:
            raise SourceError(where, f"cannot write the manifest ({e.strerror or e})") from None

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        return cls.model_validate_json(Path(path).read_text())


def _tmp_path(p: Path) -> Path:
    return p.with_suffix(p.suffix + ".tmp")


class ManifestBuilder:
    """Accumulates expectations while the replay sends.

    Ticks of a symbol depend only on that symbol's messages (plus market-wide
    ones, which produce none), so one normaliser over the whole stream yields
    exactly what the per-partition handlers produce between them.
    """

    def __init__(self) -> None:
        self.norm = Normalizer()
        self.ledgers: dict[str, SymbolLedger] = {}
        self.kinds: dict[str, Counter[str]] = {}
        self.messages: Counter[str] = Counter()
        self.deadletters: Counter[str] = Counter()
        self.source_messages = 0
        self._out: list[dict[str, Any]] = []

    def observe(self, payload: bytes, codec: str, day: str, copies: int) -> None:
        """Account one source message that is published ``copies`` times."""
        self.source_messages += 1
        out = self._out
        out.clear()
        try:
            if codec == "itch":
                msg = self.norm.on_itch(payload, day, 0, out)
                sym = self.norm.directory.get(msg.locate)
                if sym is not None:
                    self.messages[sym] += 1
            else:
                self.norm.on_json(payload, 0, out)
                if out:
                    self.messages[out[0]["symbol"]] += 1
        except DecodeError as e:
            # Every published copy is dead-lettered by the partition that reads it.
            self.deadletters[e.reason] += copies
            return
        for t in out:
            sym = t["symbol"]
            led = self.ledgers.get(sym)
            if led is None:
                led = self.ledgers[sym] = SymbolLedger()
                self.kinds[sym] = Counter()
            t["recv_ts"] = 0
            led.add(t)
            self.kinds[sym][t["kind"]] += 1

    def build(self, **kw: Any) -> Manifest:
        symbols = {
            s: SymbolExpectation(
                messages=self.messages.get(s, 0),
                ticks=led.count,
                trades=self.kinds[s]["trade"],
                quotes=self.kinds[s]["quote"],
                checksum=led.checksum,
            )
            for s, led in sorted(self.ledgers.items())
        }
        for s, n in self.messages.items():
            symbols.setdefault(s, SymbolExpectation(messages=n))
        return Manifest(
            source_messages=self.source_messages,
            deadletters_expected=sum(self.deadletters.values()),
            deadletter_reasons=dict(self.deadletters),
            book_errors=dict(self.norm.book_errors),
            symbols=symbols,
            **kw,
        )
