"""Running a replay to its manifest: resume, progress and the closing summary."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from core.client_log import MISSING_TOPICS
from core.runtime import freeze_startup_heap, stop_on_signals
from ingest.codecs.errors import SourceError
from ingest.manifest import Manifest
from ingest.replay.publisher import Replayer, ReplayerOptions, ReplayStats
from ingest.replay.settings import ReplaySettings
from ingest.replay.source import NS

log = logging.getLogger(__name__)

# A manifest that cannot be written (a full disk) is said this often while the replay goes on.
_UNWRITABLE_SAID_EVERY_S = 60.0
# Waits before each further attempt at the last manifest (15 s in all).
_LAST_WRITE_WAITS_S = (1.0, 2.0, 4.0, 8.0)


class ManifestUnwritable(RuntimeError):
    """The replay's last manifest could not be written: what was sent is on the broker,
    the manifest on disk counts less (an earlier checkpoint, or none)."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = where
        self.what = what


class _ManifestWriter:
    """Writes each checkpoint's manifest. One that cannot be written does not stop the
    feed (a market day must not get a hole for its bookkeeping): it is said once a minute,
    the next checkpoint tries again, and ``finish`` retries the last one."""

    def __init__(self, path: Path, source: str, params: dict[str, object]) -> None:
        self.path, self.source, self.params = path, source, params
        self.unwritten: Manifest | None = None  # the latest manifest not on disk
        self.error: OSError | None = None
        self._said = -_UNWRITABLE_SAID_EVERY_S

    def __call__(self, m: Manifest) -> None:
        m.source = self.source
        m.params = self.params
        try:
            m.write(self.path)
        except OSError as e:
            self.unwritten, self.error = m, e
            now = time.monotonic()
            if now - self._said >= _UNWRITABLE_SAID_EVERY_S:
                self._said = now
                log.warning(
                    "cannot write the manifest --manifest %s (%s): the replay goes on and "
                    "tries again at each checkpoint", self.path, e.strerror or e,
                )  # fmt: skip
            return
        if self.unwritten is not None:
            log.warning("the manifest %s is written again", self.path)
        self.unwritten = self.error = None

    def finish(self) -> None:
        """Retry the last manifest a few times; ManifestUnwritable if it stays unwritten."""
        for wait_s in _LAST_WRITE_WAITS_S:
            m = self.unwritten
            if m is None:
                return
            try:
                time.sleep(wait_s)
            except KeyboardInterrupt:
                break  # asked to stop: say what is left as it is
            self(m)
        m, e = self.unwritten, self.error
        if m is None:
            return
        raise ManifestUnwritable(
            f"--manifest {self.path}",
            f"cannot write it ({e.strerror if e is not None else e}); the broker acknowledged "
            f"{m.records_sent:,} records, which the manifest on disk does not all count: make "
            "room and run the same command with --resume to write it",
        )


def _clock(ns: int, codec: str) -> str:
    if codec == "json":
        return f"{ns / NS:.0f}"
    s = ns // NS
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


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

    differ = _differences(prev, source, params)
    if differ:
        raise SourceError(
            where,
            f"was written by another replay ({', '.join(differ)} differ): resume it with the "
            "options it was started with",
        )
    return prev


def _differences(prev: Manifest, source: str, params: dict[str, object]) -> list[str]:
    """What makes ``prev`` the manifest of another replay than ``source`` with ``params``."""

    def same(key: str) -> bool:
        a, b = prev.params.get(key), params.get(key)
        if key == "file" and a is not None and b is not None:
            return Path(str(a)).resolve() == Path(str(b)).resolve()
        return a == b

    differ = sorted(k for k in set(prev.params) | set(params) if not same(k))
    if prev.source != source:
        differ.insert(0, "source")
    return differ


def _sent_already(
    s: ReplaySettings, source: str, params: dict[str, object]
) -> Callable[[str | None], None] | None:
    """A check refusing to send again what a complete manifest at ``--manifest`` says this
    same replay sent to this same topic, while the topic is still the one it sent to.

    The handlers would get every record of the day twice, on top of its end-of-day books:
    a second ``docker compose up`` with the volumes of the first did that. A topic deleted
    and created since (another id) holds nothing of it, so the day goes out again there.
    """
    try:
        prev = Manifest.read(s.manifest)
    except (OSError, ValueError):
        return None
    if not prev.complete or prev.topic != s.topic or _differences(prev, source, params):
        return None

    def check(now: str | None) -> None:
        if prev.topic_id and now == prev.topic_id:
            raise SourceError(
                f"--topic {s.topic}",
                f"holds this same replay already ({s.manifest} is its complete manifest, "
                f"topic id {now}): sending it again would give the handlers every record "
                "twice; replay it into a new topic, or delete and create this one again",
            )

    return check


def _incomplete(path: Path) -> bool:
    try:
        return not Manifest.read(path).complete
    except (OSError, ValueError):
        return False


def _previous(s: ReplaySettings, source: str, params: dict[str, object]) -> Manifest | None:
    """The manifest ``--resume`` continues, or None for a fresh replay."""
    if s.resume:
        return resume_from(s.manifest, source, params, s.topic)
    if _incomplete(s.manifest):
        # Starting over would send again what that run sent.
        raise SourceError(
            str(s.manifest),
            "is the manifest of a replay that did not finish: --resume carries it on "
            "(or remove it to start over)",
        )
    return None


class _Bar:
    """The replay's progress line: source clock, messages, rate."""

    def __init__(self, console: Console, source: str, codec: str, enabled: bool) -> None:
        self.codec = codec
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]replay[/] {task.description}"),
            TextColumn("clock {task.fields[clock]}"),
            TextColumn("{task.completed:,} msgs"),
            TextColumn("{task.fields[rate]:,.0f} msg/s"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task(source, total=None, clock="--:--:--", rate=0.0)

    def update(self, st: ReplayStats) -> None:
        el = max(1e-9, time.monotonic() - st.started)
        self.progress.update(
            self.task,
            completed=st.source_messages,
            clock=_clock(st.source_clock_ns, self.codec),
            rate=st.records / el,
        )


def _summary(st: ReplayStats, m: Manifest, resumed: bool, manifest: Path) -> str:
    ticks = sum(s.ticks for s in m.symbols.values())
    sent = st.records - st.resumed_records
    after = f" after the {st.resumed_messages:,} resumed" if resumed else ""
    return (
        f"replayed {st.source_messages - st.resumed_messages:,} messages{after} "
        f"({sent:,} records incl. broadcast) "
        f"in {st.elapsed:.1f}s = {sent / max(st.elapsed, 1e-9):,.0f} records/s; "
        f"symbols={len(m.symbols)} expected ticks={ticks:,} "
        f"dead letters expected={m.deadletters_expected}; "
        f"pacing drift p99={m.pacing.get('drift_p99_s', 0):.3f}s "
        f"max={m.pacing.get('drift_max_s', 0):.3f}s; manifest {manifest}"
        + ("" if m.complete else " (incomplete: --resume carries on)")
    )


async def _run(s: ReplaySettings, replayer: Replayer, bar: _Bar, day_s: str) -> Manifest:
    """The replay, the manifest it ends with written; the clock published beside it."""
    # Each ends the replay with its manifest written.
    stop_on_signals(asyncio.get_running_loop(), replayer.stop)
    clock_stop = asyncio.Event()
    clock = None
    if s.redis_url:
        from ingest.replay.clock import publish_clock

        clock = asyncio.create_task(
            publish_clock(s.redis_url, replayer.stats, day_s, s.pace, clock_stop)
        )
    freeze_startup_heap()
    try:
        with bar.progress:
            return await replayer.run()
    finally:
        clock_stop.set()
        if clock is not None:
            await clock


def run_replay(settings: ReplaySettings) -> bool:
    """Replay what ``settings`` describe, writing the manifest as it goes; False if a signal
    stopped it.

    :raises SourceError: an input that cannot be used, named; raised before the
        first record where it can be known in advance, else after the manifest of
        what was sent
    :raises BrokerOutage: the broker was gone past the outage deadline
    :raises ManifestUnwritable: the last manifest could not be written (a full disk)
    """
    s = settings
    Manifest.check_writable(s.manifest)
    spec = s.spec()
    src, codec, day_s, params = spec.build()
    console = Console(stderr=True)
    prev = _previous(s, spec.source, params)
    if prev is not None and prev.complete:
        n = prev.source_messages
        console.print(f"{s.manifest} is complete ({n:,} messages): nothing to resume")
        return True
    bar = _Bar(console, spec.source, codec, s.progress)

    write = _ManifestWriter(Path(s.manifest), spec.source, params)
    options = ReplayerOptions(
        checkpoint=write, checkpoint_every_s=s.checkpoint_every_s, resume=prev,
        outage_deadline_s=s.outage_deadline_s, connect_timeout_s=s.connect_timeout_s,
        check_topic=None if prev is not None else _sent_already(s, spec.source, params),
    )  # fmt: skip
    replayer = Replayer(s.bootstrap, s.topic, src, s.pace, day_s, bar.update, options=options)
    MISSING_TOPICS.install()  # a topic deleted under the replay floods the log otherwise
    try:
        m = asyncio.run(_run(s, replayer, bar, day_s))
    except BaseException:
        try:
            write.finish()  # its manifest is what --resume carries on from
        except ManifestUnwritable as e:
            log.warning("%s", e)  # beside what stopped the replay, which is said next
        raise
    write.finish()
    console.print(_summary(replayer.stats, m, prev is not None, s.manifest))
    # False when a signal cut the replay short: the manifest covers only what was sent.
    return not replayer.interrupted


__all__ = ["ManifestUnwritable", "resume_from", "run_replay"]
