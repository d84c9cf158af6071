"""What a replay sends: its source options, checked, and the messages they make.

The replay command, ``tickscale up`` and the load test's feed all describe their
source with a :class:`SourceSpec`. A wrong option is a :class:`SourceError`
whose ``where`` names the option, so each caller reports it its own way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from ingest.codecs import itch
from ingest.codecs.errors import SourceError
from ingest.replay.source import (
    MAX_LINE_BYTES,
    NS,
    ItchWindow,
    JsonWindow,
    RawMessage,
    check_readable,
    file_faults,
    itch_file_source,
    jsonl_source,
    parse_hhmm,
    parse_only,
    subset_of,
)
from ingest.replay.synthetic import SyntheticDay

CALENDAR = "XNYS"


def resolve_day(day: str | None) -> tuple[str, int]:
    """The trading date to stamp and its close (seconds since midnight).

    A date that is not a session of the exchange calendar is a user error, not
    something to replay silently as a normal day.
    """
    import exchange_calendars as xcals
    import pandas as pd

    cal = xcals.get_calendar(CALENDAR)
    if day is None:
        d = cal.date_to_session(pd.Timestamp(date.today()), direction="previous")
    else:
        try:
            d = pd.Timestamp(date.fromisoformat(day))
        except ValueError:
            raise SourceError("--date", f"expected YYYY-MM-DD, got {day!r}") from None
        if not cal.is_session(d):
            raise SourceError("--date", f"{day} is not a {CALENDAR} trading day")
    close = cal.session_close(d).tz_convert("America/New_York")
    return d.date().isoformat(), close.hour * 3600 + close.minute * 60


def with_malformed(source: Iterable[RawMessage], every: int) -> Iterator[RawMessage]:
    """Inject a malformed copy after every ``every`` keyed messages (for dead-letter drills).

    Three kinds in turn, so each decoder path is exercised: a truncated
    message, an unknown type byte and, for ITCH, an add order with a bad side.
    """
    n = 0
    kind = 0
    for m in source:
        yield m
        if m.key is None:
            continue
        n += 1
        if n % every:
            continue
        kind = (kind + 1) % 3
        if m.codec == "json":
            bad = [m.payload[: len(m.payload) // 2], b'{"type": "bogus"}', b"not json"][kind]
        elif kind == 0:
            bad = m.payload[: max(1, len(m.payload) - 3)]
        elif kind == 1:
            bad = b"z" + m.payload[1:]
        else:
            add = itch.AddOrder(1, 0, m.ts_ns % (86_400 * NS), 0, "B", 1, "BAD", 1)
            bad = itch.encode(add)
            bad = bad[:19] + b"?" + bad[20:]
        yield RawMessage(m.ts_ns, m.key, bad, m.codec)


@dataclass(frozen=True)
class SourceSpec:
    """What a replay sends: the replay command's source options. The replay
    command, ``tickscale up`` and the load test's feed all describe their source
    with one and build it with ``build()``."""

    source: str
    symbols: int
    seed: int
    file: Path | None = None
    rate: float = 1.0
    day: str | None = None
    start: str | None = None
    end: str | None = None
    malformed_every: int = 0
    only: str | None = None
    max_line_bytes: int = MAX_LINE_BYTES

    def _input(self, what: str) -> Path:
        """The input file, readable (SourceError naming it if not)."""
        if self.file is None:
            raise SourceError("--file", f"{what} file is required")
        check_readable(self.file)
        return self.file

    def _window(self) -> tuple[int | None, int | None, frozenset[str] | None]:
        """(start, end) seconds since midnight and the symbol subset, checked."""
        try:
            start_s = None if self.start is None else parse_hhmm(self.start)
        except ValueError as e:
            raise SourceError("--from", str(e)) from None
        try:
            end_s = None if self.end is None else parse_hhmm(self.end)
        except ValueError as e:
            raise SourceError("--to", str(e)) from None
        if start_s is not None and end_s is not None and end_s <= start_s:
            raise SourceError("--to", "--to must be after --from")
        try:
            return start_s, end_s, parse_only(self.only)
        except ValueError as e:
            raise SourceError("--only", str(e)) from None

    def build(self) -> tuple[Iterable[RawMessage], str, str, dict[str, object]]:
        """(messages, codec, trading date, manifest params) of the replay.

        :raises SourceError: naming the option that is wrong (``where`` is the option)
        :raises SourceError: naming an input file that cannot be read
        """
        start_s, end_s, subset = self._window()
        params: dict[str, object] = {
            "from": self.start,
            "to": self.end,
            "malformed_every": self.malformed_every,
        }
        codec = "itch"
        src: Iterable[RawMessage]
        if self.source == "synthetic":
            day_s, close = resolve_day(self.day)
            day = SyntheticDay(self.symbols, self.seed, self.rate, close)
            src = ItchWindow(subset_of(day, subset), start_s, end_s)
            params |= {"symbols": self.symbols, "seed": self.seed, "rate": self.rate}
            params["close"] = close
        elif self.source == "itch":
            file = self._input("an ITCH")
            day_s, close = resolve_day(self.day)
            frames = file_faults(itch_file_source(file), file)
            src = ItchWindow(subset_of(frames, subset), start_s, end_s)
            # The load test's report shades the sessions from it (early closes included).
            params |= {"file": str(file), "close": close}
        elif self.source == "jsonl":
            file = self._input("a JSON-lines")
            day_s = self.day or ""
            codec = "json"
            lines = jsonl_source(file, self.max_line_bytes)
            src = JsonWindow(subset_of(lines, subset), start_s, end_s, self.day)
            params |= {"file": str(file)}
        else:
            raise SourceError("--source", "expected synthetic, itch or jsonl")
        if self.malformed_every:
            src = with_malformed(src, self.malformed_every)
        params["date"] = day_s
        if subset is not None:
            params["only"] = sorted(subset)
        return src, codec, day_s, params
