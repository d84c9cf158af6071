"""Wiring of ``tickscale replay``: source selection, calendar, progress, summary."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ingest import sessions
from ingest.codecs import itch
from ingest.codecs.errors import SourceError
from ingest.manifest import Manifest
from ingest.replay.publisher import Replayer, ReplayStats
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
from tickscale.runtime import freeze_startup_heap, stop_on_signals

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
            raise typer.BadParameter(
                f"expected YYYY-MM-DD, got {day!r}", param_hint="--date"
            ) from None
        if not cal.is_session(d):
            raise typer.BadParameter(f"{day} is not a {CALENDAR} trading day", param_hint="--date")
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


def _clock(ns: int, codec: str) -> str:
    if codec == "json":
        return f"{ns / NS:.0f}"
    s = ns // NS
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


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
            raise typer.BadParameter(f"{what} file is required", param_hint="--file")
        check_readable(self.file)
        return self.file

    def build(self) -> tuple[Iterable[RawMessage], str, str, dict[str, object]]:
        """(messages, codec, trading date, manifest params) of the replay.

        :raises typer.BadParameter: naming the option that is wrong
        :raises SourceError: naming an input file that cannot be read
        """
        try:
            start_s = None if self.start is None else parse_hhmm(self.start)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--from") from None
        try:
            end_s = None if self.end is None else parse_hhmm(self.end)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--to") from None
        if start_s is not None and end_s is not None and end_s <= start_s:
            raise typer.BadParameter("--to must be after --from", param_hint="--to")
        try:
            subset = parse_only(self.only)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--only") from None

        params: dict[str, object] = {
            "from": self.start,
            "to": self.end,
            "malformed_every": self.malformed_every,
        }
        codec = "itch"
        src: Iterable[RawMessage]
        if self.source == "synthetic":
            day_s, close = resolve_day(self.day)
            src = ItchWindow(
                subset_of(SyntheticDay(self.symbols, self.seed, self.rate, close), subset),
                start_s,
                end_s,
            )
            params |= {
                "symbols": self.symbols,
                "seed": self.seed,
                "rate": self.rate,
                "close": close,
            }
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
            raise typer.BadParameter("expected synthetic, itch or jsonl", param_hint="--source")
        if self.malformed_every:
            src = with_malformed(src, self.malformed_every)
        params["date"] = day_s
        if subset is not None:
            params["only"] = sorted(subset)
        return src, codec, day_s, params


def resume_from(path: Path, source: str, params: dict[str, object], topic: str) -> Manifest:
    """The manifest of the run ``--resume`` continues: it must be this replay's.

    :raises SourceError: no manifest there, not a manifest, or another replay's
    """
    where = str(path)
    if not path.is_file():
        raise SourceError(where, "no manifest to resume from (run without --resume)")
    try:
        prev = Manifest.read(path)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(where, f"not a replay manifest ({first})") from None
    if prev.topic != topic:
        raise SourceError(where, f"was written for topic {prev.topic!r}, not {topic!r}")

    def same(key: str) -> bool:
        a, b = prev.params.get(key), params.get(key)
        if key == "file" and a is not None and b is not None:
            return Path(str(a)).resolve() == Path(str(b)).resolve()
        return a == b

    differ = sorted(k for k in set(prev.params) | set(params) if not same(k))
    if prev.source != source:
        differ.insert(0, "source")
    if differ:
        raise SourceError(
            where,
            f"was written by another replay ({', '.join(differ)} differ): resume it with the "
            "options it was started with",
        )
    return prev


def _incomplete(path: Path) -> bool:
    try:
        return not Manifest.read(path).complete
    except (OSError, ValueError):
        return False


def run_replay(
    spec: SourceSpec,
    *,
    manifest: Path,
    bootstrap: str,
    topic: str,
    speed: float | None,
    progress: bool,
    redis_url: str | None = None,
    resume: bool = False,
    outage_deadline_s: float = 300.0,
    connect_timeout_s: float = 10.0,
    checkpoint_every_s: float = 5.0,
) -> bool:
    """Replay ``spec``, writing the manifest as it goes; False if a signal stopped it.

    :raises SourceError: an input that cannot be used, named; raised before the
        first record where it can be known in advance, else after the manifest of
        what was sent
    :raises BrokerOutage: the broker was gone past the outage deadline
    """
    Manifest.check_writable(manifest)
    src, codec, day_s, params = spec.build()
    source = spec.source
    console = Console(stderr=True)
    prev = resume_from(manifest, source, params, topic) if resume else None
    if not resume and _incomplete(manifest):
        # Starting over would send again what that run sent.
        raise SourceError(
            str(manifest),
            "is the manifest of a replay that did not finish: --resume carries it on "
            "(or remove it to start over)",
        )
    if prev is not None and prev.complete:
        n = prev.source_messages
        console.print(f"{manifest} is complete ({n:,} messages): nothing to resume")
        return True

    bar = Progress(
        SpinnerColumn(),
        TextColumn("[bold]replay[/] {task.description}"),
        TextColumn("clock {task.fields[clock]}"),
        TextColumn("{task.completed:,} msgs"),
        TextColumn("{task.fields[rate]:,.0f} msg/s"),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=False,
    )
    task = bar.add_task(source, total=None, clock="--:--:--", rate=0.0)

    def on_progress(st: ReplayStats) -> None:
        import time

        el = max(1e-9, time.monotonic() - st.started)
        bar.update(
            task,
            completed=st.source_messages,
            clock=_clock(st.source_clock_ns, codec),
            rate=st.records / el,
        )

    def write(m: Manifest) -> None:
        m.source = source
        m.params = params
        m.write(manifest)

    replayer = Replayer(
        bootstrap,
        topic,
        src,
        speed,
        day_s,
        on_progress,
        checkpoint=write,
        checkpoint_every_s=checkpoint_every_s,
        resume=prev,
        outage_deadline_s=outage_deadline_s,
        connect_timeout_s=connect_timeout_s,
    )

    async def main() -> None:
        # Each ends the replay with its manifest written.
        stop_on_signals(asyncio.get_running_loop(), replayer.stop)
        clock_stop = asyncio.Event()
        clock = None
        if redis_url:
            from ingest.replay.clock import publish_clock

            clock = asyncio.create_task(
                publish_clock(redis_url, replayer.stats, day_s, speed, clock_stop)
            )
        freeze_startup_heap()
        try:
            with bar:
                m = await replayer.run()
        finally:
            clock_stop.set()
            if clock is not None:
                await clock
        st = replayer.stats
        ticks = sum(s.ticks for s in m.symbols.values())
        sent = st.records - st.resumed_records
        resumed = f" after the {st.resumed_messages:,} resumed" if prev is not None else ""
        console.print(
            f"replayed {st.source_messages - st.resumed_messages:,} messages{resumed} "
            f"({sent:,} records incl. broadcast) "
            f"in {st.elapsed:.1f}s = {sent / max(st.elapsed, 1e-9):,.0f} records/s; "
            f"symbols={len(m.symbols)} expected ticks={ticks:,} "
            f"dead letters expected={m.deadletters_expected}; "
            f"pacing drift p99={m.pacing.get('drift_p99_s', 0):.3f}s "
            f"max={m.pacing.get('drift_max_s', 0):.3f}s; manifest {manifest}"
            + ("" if m.complete else " (incomplete: --resume carries on)")
        )

    asyncio.run(main())
    # False when a signal cut the replay short: the manifest covers only what was sent.
    return not replayer.interrupted


__all__ = ["SourceSpec", "resolve_day", "run_replay", "sessions"]
