"""The ``tickscale`` command: one entry point, a subcommand per role.

Each subcommand reads its settings once here, at the edge, and fails before
doing anything if a setting is invalid, naming it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from core.cli_errors import OneLineErrors
from core.cli_settings import load, options_from
from ingest.handler.settings import HandlerSettings
from ingest.replay.settings import ReplaySettings
from ingest.verify_settings import VerifySettings
from tickscale.up_settings import UpSettings

if TYPE_CHECKING:
    from ingest.manifest import Manifest
    from ingest.verify import ExpectedDeadLetter, SourceExpectation, VerifyResult

app = typer.Typer(
    name="tickscale",
    help="Autoscaling market-data ingestion: replay feeds, feed handlers, scaler, verification.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    cls=OneLineErrors,
)

log = logging.getLogger("tickscale")

# The scaler's commands live with the scaler; mounted here so there is one console script.
from scaler.cli import app as _scaler_app  # noqa: E402

app.add_typer(_scaler_app, name="scaler")
from tickscale.loadtest.cli import app as _loadtest_app  # noqa: E402

app.add_typer(_loadtest_app, name="loadtest")
from tickscale.rollout import rollout as _rollout  # noqa: E402

app.command("rollout")(_rollout)


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = "INFO",
) -> None:
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown level {log_level!r}", param_hint="--log-level")
    from core.client_log import CLIENT_REPEATS

    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        # An outage's client errors: each kind once, then one line a minute.
        handlers=[CLIENT_REPEATS.handler(sys.stderr)],
    )
    logging.getLogger("aiokafka").setLevel(max(level, logging.WARNING))
    from core.secrets import client_secrets

    # Passwords are read once, here, so a placeholder stops every role before it starts.
    try:
        client_secrets()
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "kafka_username"
        where = f"TICKSCALE_{name.upper()}"
        if name.endswith("_password"):
            where = f"the secret file tickscale_{name}"
        typer.echo(f"error: {where}: {err['msg']}", err=True)
        raise typer.Exit(2) from None


# --- replay -------------------------------------------------------------------------------


def _fail(where: str, what: str, code: int = 2) -> typer.Exit:
    """One line naming the input and what is wrong with it; raise the exit it returns
    (2: the user's to fix)."""
    typer.echo(f"error: {where}: {what}", err=True)
    return typer.Exit(code)


@app.command()
@options_from(ReplaySettings)
def replay(ctx: typer.Context, given: dict[str, Any]) -> None:
    """Replay a market day into the raw topic and write its manifest.

    Settings also come from TICKSCALE_REPLAY_* variables; flags win.

    Exits 2 with one line naming the input for an input that cannot be used, 1 when
    the replay stopped before the end (a signal, the broker gone past the outage
    deadline, the topic deleted) or its last manifest could not be written (a full disk);
    the manifest then counts what the broker acknowledged, or less.
    """
    from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError

    from ingest.codecs.errors import SourceError
    from ingest.replay.publisher import BrokerOutage
    from ingest.replay.run import ManifestUnwritable, run_replay

    settings = load(ReplaySettings, given)
    try:
        ok = run_replay(settings)
    except SourceError as e:
        raise _fail(e.where, e.what) from None
    except (BrokerOutage, ManifestUnwritable) as e:
        raise _fail(e.where, e.what, code=1) from None
    except (MessageSizeTooLargeError, RecordTooLargeError) as e:
        # Only a topic taking less than md.raw's 1 MiB a record gets here: every line
        # the source accepts fits that (ingest/replay/source.py).
        where = f"--topic {settings.topic}"
        raise _fail(
            where,
            f"refused a record as too large ({e}); its max.message.bytes is below what "
            "the replay sends: raise it, or lower --max-line-bytes",
        ) from None
    except KafkaError as e:
        where = f"--bootstrap {settings.bootstrap}"
        raise _fail(where, f"the broker refused the replay ({e})", 1) from None
    if not ok:
        raise typer.Exit(1)


# --- handler ------------------------------------------------------------------------------


@app.command()
@options_from(HandlerSettings)
def handler(ctx: typer.Context, given: dict[str, Any]) -> None:
    """Run one feed handler: md.raw -> ticks on md.ticks, exactly once.

    Settings also come from TICKSCALE_HANDLER_* variables; flags win."""
    from core.http import CannotListen, PortInUse
    from core.reach import BrokerUnreachable
    from core.runtime import freeze_startup_heap
    from core.topology import TopicMissing
    from ingest.handler.service import FeedHandler

    settings = load(HandlerSettings, given)

    async def main() -> None:
        h = FeedHandler(settings)
        h.install_signal_handlers()
        async with h:
            freeze_startup_heap()
            await h.run()

    try:
        asyncio.run(main())
    except PortInUse as e:
        typer.echo(
            f"error: metrics port {e.port} is already in use (another handler on this "
            "machine?); choose a free one with --metrics-port N, or --metrics-port 0 for any",
            err=True,
        )
        raise typer.Exit(2) from None
    except CannotListen as e:
        raise _fail(f"--metrics-host {e.host}", e.strerror or str(e)) from None
    except BrokerUnreachable as e:
        raise _fail(e.where, e.what) from None
    except TopicMissing as e:
        flag = _topic_flag(settings, e.topic)
        raise _fail(
            flag, f"no such topic on {settings.bootstrap} (create it: tickscale topics)"
        ) from None


def _topic_flag(s: HandlerSettings, topic: str) -> str:
    """The handler's flag naming ``topic``, with the value given."""
    from core.cli_settings import flag_of

    for name in ("in_topic", "out_topic", "deadletter_topic"):
        if getattr(s, name) == topic:
            return f"{flag_of(name, HandlerSettings.model_fields[name])} {topic}"
    return f"topic {topic}"


# --- verify -------------------------------------------------------------------------------


@app.command()
@options_from(VerifySettings)
def verify(ctx: typer.Context, given: dict[str, Any]) -> None:
    """Check md.ticks against a manifest or the source file: nothing lost, duplicated, reordered.

    Also checks each symbol's checksum and the dead letters. Settings also come from
    TICKSCALE_VERIFY_* variables; flags win. Exit status: 0 exact, 1 problems found, 2 input
    to fix, 3 the broker failed the check (nothing concluded)."""
    from aiokafka.errors import KafkaError

    from core.reach import BrokerLost, BrokerUnreachable
    from core.topology import TopicMissing
    from ingest.verify import TopicGone, run_verify

    s = load(VerifySettings, given)
    m, expected_dls = _expectations(s)
    try:
        res = run_verify(
            s.bootstrap, s.topic, m, s.deadletter_topic or None, timeout_s=s.timeout_s,
            expected_deadletters=expected_dls, connect_timeout_s=s.connect_timeout_s,
            outage_s=s.outage_deadline_s,
        )  # fmt: skip
    except BrokerUnreachable as e:
        raise _fail(e.where, e.what) from None
    except (BrokerLost, TopicGone) as e:
        raise _fail(e.where, e.what, code=3) from None
    except TopicMissing as e:
        flag = "--topic" if e.topic == s.topic else "--deadletter-topic"
        raise _fail(f"{flag} {e.topic}", f"no such topic on {s.bootstrap}") from None
    except KafkaError as e:
        # Past the waits above: a failure the broker may not repeat is not the input's.
        what = f"the broker failed the check ({e}); nothing was concluded"
        raise _fail(f"--bootstrap {s.bootstrap}", what, 3 if e.retriable else 2) from None
    _report(res, m, s.json_out)
    if not res.ok:
        raise typer.Exit(1)


def _expectations(s: VerifySettings) -> tuple[Manifest, list[ExpectedDeadLetter] | None]:
    """What the ticks must be: the manifest, or the source file's expectations (with its
    dead letters); exits 2 naming the input that cannot be used."""
    from ingest.manifest import Manifest

    if (s.manifest is None) == (s.source is None):
        raise _fail("--manifest", "give either --manifest or --source")
    if s.source is not None:
        exp = _expect_from_source(s.source, s.day, s.start, s.end, s.only)
        if any(d.broadcast for d in exp.deadletters):
            from core.reach import BrokerUnreachable, reach_topics
            from core.topology import TopicMissing

            try:
                found = asyncio.run(reach_topics(s.bootstrap, [s.raw_topic], s.connect_timeout_s))
            except BrokerUnreachable as e:
                raise _fail(e.where, e.what) from None
            except TopicMissing as e:
                raise _fail(f"--raw-topic {s.raw_topic}", str(e)) from None
            exp.set_partitions(len(found[s.raw_topic]))
        else:
            exp.set_partitions(1)
        return exp.manifest, exp.deadletters
    assert s.manifest is not None
    try:
        return Manifest.read(s.manifest), None
    except FileNotFoundError:
        raise _fail("--manifest", f"{s.manifest} does not exist") from None
    except OSError as e:
        raise _fail(f"--manifest {s.manifest}", e.strerror or str(e)) from None
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "the file"
        raise _fail(
            f"--manifest {s.manifest}",
            f"not a manifest written by tickscale replay ({field}: {err['msg']})",
        ) from None


def _report(res: VerifyResult, m: Manifest, json_out: Path | None) -> None:
    import orjson

    for sym, d in list(res.per_symbol.items())[:20]:
        typer.echo(f"{sym}: {d}")
    if len(res.per_symbol) > 20:
        typer.echo(f"... {len(res.per_symbol) - 20} more symbols with problems")
    typer.echo(
        f"ticks read={res.ticks_read} expected={res.ticks_expected} "
        f"symbols={len(m.symbols)} unexpected_symbols={res.unexpected_symbols}"
        + (f" other_days={res.ticks_other_days}" if res.ticks_other_days else "")
        + (f" unreadable={res.unreadable}" if res.unreadable else "")
    )
    for dl in (res.deadletter_spans or [])[:50]:
        typer.echo(dl.line())
    if res.deadletters is not None:
        typer.echo(f"deadletters={res.deadletters} expected={res.deadletters_expected}")
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(res.to_dict(), option=orjson.OPT_INDENT_2))
    typer.echo(res.summary_line())


def _expect_from_source(
    path: Path, day: str | None, start: str | None, end: str | None, only: str | None
) -> SourceExpectation:
    """The expectations of a replay of ``path`` (ITCH or JSON lines, told by its first
    byte); exits 2 naming the input when the file cannot be used."""
    from ingest.codecs.errors import SourceError
    from ingest.replay.spec import SourceSpec
    from ingest.verify import expect_from_source, locate_deadletters

    try:
        with path.open("rb") as f:
            head = f.read(64).lstrip()
    except OSError as e:
        typer.echo(f"error: --source {path}: {e.strerror or e}", err=True)
        raise typer.Exit(2) from None
    kind = "jsonl" if head[:1] == b"{" else "itch"
    spec = SourceSpec(
        source=kind, file=path, symbols=1, seed=0, day=day, start=start, end=end, only=only
    )
    try:
        src, codec, day_s, _ = spec.build()
        exp = expect_from_source(src, codec, day_s, kind)
        locate_deadletters(path, codec, exp.deadletters)
    except SourceError as e:
        typer.echo(f"error: {e.where}: {e.what}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:
        typer.echo(f"error: --source {path}: {e.strerror or e}", err=True)
        raise typer.Exit(2) from None
    return exp


# --- topics -------------------------------------------------------------------------------


@app.command()
def topics(
    bootstrap: Annotated[str, typer.Option(help="Kafka HOST:PORT")] = "127.0.0.1:9092",
    raw_partitions: Annotated[int, typer.Option(min=1)] = 12,
    ticks_partitions: Annotated[
        int | None,
        typer.Option(min=1, help="default: the md.raw count, so the topics are co-partitioned"),
    ] = None,
    replication: Annotated[int, typer.Option(min=1)] = 1,
    connect_timeout: Annotated[
        float, typer.Option(min=0.1, help="seconds to wait for a broker, retrying")
    ] = 30.0,
) -> None:
    """Create md.raw, md.ticks and md.deadletter if they do not exist."""
    from aiokafka.errors import InvalidReplicationFactorError, KafkaError

    from core.reach import BrokerUnreachable, reach
    from core.topology import create_topics

    ticks = ticks_partitions or raw_partitions
    make = functools.partial(create_topics, bootstrap, raw_partitions, ticks, replication)
    try:
        asyncio.run(reach(bootstrap, connect_timeout, make))
    except BrokerUnreachable as e:
        raise _fail(e.where, e.what) from None
    except InvalidReplicationFactorError as e:
        raise _fail(f"--replication {replication}", str(e)) from None
    except KafkaError as e:
        # Another request the broker refused: no right to create topics, say.
        raise _fail(f"--bootstrap {bootstrap}", f"the broker refused the topics: {e}") from None
    typer.echo(f"topics ready on {bootstrap}")


# --- up -----------------------------------------------------------------------------------


@app.command()
def secrets(
    folder: Annotated[Path, typer.Argument(help="the compose stack's SECRETS_DIR")],
) -> None:
    """Make the compose stack's password files that are missing, each a random value.

    Existing files are kept: rotating one is editing it (docs/security.md).
    """
    from tickscale.stack_secrets import make_secrets

    try:
        made = make_secrets(folder.absolute())
    except OSError as e:
        raise _fail(str(folder), f"cannot write the password files there: {e}") from None
    for name in made:
        typer.echo(f"wrote {folder / name}")
    typer.echo(f"SECRETS_DIR={folder.absolute()}")


@app.command()
@options_from(UpSettings)
def up(ctx: typer.Context, given: dict[str, Any]) -> None:
    """Run the whole pipeline on this machine: a replayed day through handlers, verified.

    Starts Kafka, Redis, the scaler and its handlers, replays the day and checks the ledger."""
    from rich.console import Console

    from core.cli_settings import flag_of
    from tickscale.up_settings import FULL_DAY_ONLY

    s = load(UpSettings, given)
    fields = UpSettings.model_fields
    if not s.full_day:
        for name in FULL_DAY_ONLY:
            if name in given:
                raise _fail(
                    flag_of(name, fields[name]), "applies to the longer day only: add --full-day"
                )
        from tickscale.quickday import run_quick_day

        # A log is no terminal: one ledger line there, not one folded into 80 columns.
        console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)
        raise typer.Exit(run_quick_day(s.seed, s.day, s.out, console))
    if s.out is not None:
        raise _fail("--out", "applies to the compressed day only (--full-day uses --state-dir)")
    from tickscale.up import run_up

    raise typer.Exit(run_up(s))
