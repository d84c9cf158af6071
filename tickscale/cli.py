"""The ``tickscale`` command: one entry point, a subcommand per role.

Each subcommand reads its settings once here, at the edge, and fails before
doing anything if a setting is invalid, naming it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from core import constants as c

if TYPE_CHECKING:
    from ingest.verify import SourceExpectation

app = typer.Typer(
    name="tickscale",
    help="Autoscaling market-data ingestion: replay feeds, feed handlers, scaler, verification.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("tickscale")

# The scaler's commands live with the scaler; mounted here so there is one console script.
from scaler.cli import app as _scaler_app  # noqa: E402

app.add_typer(_scaler_app, name="scaler")
from tickscale.loadtest.cli import app as _loadtest_app  # noqa: E402

app.add_typer(_loadtest_app, name="loadtest")


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = "INFO",
) -> None:
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
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


def _fail_settings(e: ValidationError, flags: dict[str, str]) -> None:
    for err in e.errors():
        name = str(err["loc"][0]) if err["loc"] else "?"
        hint = flags.get(name, name)
        typer.echo(f"error: invalid setting {hint}: {err['msg']}", err=True)
    raise typer.Exit(2)


# --- replay -------------------------------------------------------------------------------


def _fail(where: str, what: str, code: int = 2) -> typer.Exit:
    """One line naming the input and what is wrong with it; raise the exit it returns
    (2: the user's to fix)."""
    typer.echo(f"error: {where}: {what}", err=True)
    return typer.Exit(code)


def _speed(value: str) -> float | None:
    import math

    if value.lower() == "max":
        return None
    try:
        v = float(value)
    except ValueError:
        raise _fail("--speed", f"expected a number or 'max', got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise _fail("--speed", f"expected a finite number > 0 or 'max', got {value!r}")
    return v


@app.command()
def replay(
    manifest: Annotated[
        Path, typer.Option(help="where to write the manifest (JSON), as the replay goes")
    ],
    bootstrap: Annotated[str, typer.Option(help="Kafka HOST:PORT")] = "127.0.0.1:9092",
    topic: Annotated[str, typer.Option(help="raw topic")] = c.RAW_TOPIC,
    source: Annotated[str, typer.Option(help="synthetic | itch | jsonl")] = "synthetic",
    file: Annotated[Path | None, typer.Option(help="input file for itch/jsonl")] = None,
    symbols: Annotated[int, typer.Option(min=1, help="synthetic: instruments")] = 50,
    seed: Annotated[int, typer.Option(help="synthetic: the day's seed")] = 1,
    rate: Annotated[
        float, typer.Option(min=0.001, help="synthetic: midday msgs/s per symbol")
    ] = 1.0,
    day: Annotated[
        str | None, typer.Option("--date", help="trading date YYYY-MM-DD (default: last session)")
    ] = None,
    from_: Annotated[str | None, typer.Option("--from", help="start HH:MM (exchange time)")] = None,
    to: Annotated[str | None, typer.Option("--to", help="end HH:MM (exchange time)")] = None,
    speed: Annotated[str, typer.Option(help="1 = real time, 60 = a minute per second, max")] = "1",
    malformed_every: Annotated[
        int, typer.Option(min=0, help="inject a malformed message after every N (0 = none)")
    ] = 0,
    only: Annotated[
        str | None,
        typer.Option(help="only these symbols, comma-separated (and market-wide messages)"),
    ] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    redis: Annotated[
        str | None,
        typer.Option(
            help="Redis URL: publish the replay clock for the scaler",
            envvar="TICKSCALE_REPLAY_REDIS_URL",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="carry on the replay whose incomplete --manifest is there (same options): "
            "what it sent is not sent again",
        ),
    ] = False,
    outage_deadline: Annotated[
        float,
        typer.Option(
            min=1,
            help="seconds the broker may acknowledge nothing (down, restarting) before "
            "the replay gives up",
        ),
    ] = 300.0,
    connect_timeout: Annotated[
        float, typer.Option(min=0, help="seconds to wait for a broker before the first record")
    ] = 10.0,
    checkpoint_every: Annotated[
        float, typer.Option(min=0.1, help="seconds between manifest checkpoints")
    ] = 5.0,
    max_line_bytes: Annotated[
        int, typer.Option(min=64, help="jsonl: the longest line accepted, in bytes")
    ] = 1 << 20,
) -> None:
    """Replay a market day into the raw topic and write its manifest.

    Exits 2 with one line naming the input for an input that cannot be used, 1 when
    the replay stopped before the end (a signal, the broker gone past the outage
    deadline); the manifest then counts what the broker acknowledged.
    """
    from aiokafka.errors import KafkaError

    from ingest.codecs.errors import SourceError
    from ingest.replay.publisher import BrokerOutage
    from ingest.replay.run import run_replay
    from ingest.replay.spec import SourceSpec

    spec = SourceSpec(
        source=source, file=file, symbols=symbols, seed=seed, rate=rate, day=day,
        start=from_, end=to, malformed_every=malformed_every, only=only,
        max_line_bytes=max_line_bytes,
    )  # fmt: skip
    pace = _speed(speed)
    try:
        ok = run_replay(
            spec,
            manifest=manifest,
            bootstrap=bootstrap,
            topic=topic,
            speed=pace,
            progress=progress,
            redis_url=redis,
            resume=resume,
            outage_deadline_s=outage_deadline,
            connect_timeout_s=connect_timeout,
            checkpoint_every_s=checkpoint_every,
        )
    except SourceError as e:
        raise _fail(e.where, e.what) from None
    except BrokerOutage as e:
        raise _fail(e.where, e.what, code=1) from None
    except KafkaError as e:
        raise _fail(f"--bootstrap {bootstrap}", f"the broker refused the replay ({e})", 1) from None
    if not ok:
        raise typer.Exit(1)


# --- handler ------------------------------------------------------------------------------


@app.command()
def handler(
    bootstrap: Annotated[str | None, typer.Option(help="Kafka HOST:PORT")] = None,
    in_topic: Annotated[str | None, typer.Option("--in", help="raw topic")] = None,
    out_topic: Annotated[str | None, typer.Option("--out", help="tick topic")] = None,
    deadletter: Annotated[str | None, typer.Option(help="dead-letter topic")] = None,
    group: Annotated[str | None, typer.Option(help="consumer group")] = None,
    redis: Annotated[str | None, typer.Option(help="Redis URL")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="HTTP port, 0 = any")] = None,
    eos: Annotated[bool | None, typer.Option(help="exactly-once transactions")] = None,
    max_batch: Annotated[int | None, typer.Option(help="raw messages per transaction")] = None,
    handler_id: Annotated[str | None, typer.Option("--id", help="handler identity")] = None,
) -> None:
    """Run one feed handler: md.raw -> ticks on md.ticks, exactly once."""
    from core.http import PortInUse
    from core.runtime import freeze_startup_heap
    from ingest.handler.service import FeedHandler
    from ingest.handler.settings import HandlerSettings

    overrides: dict[str, Any] = {
        "bootstrap": bootstrap,
        "in_topic": in_topic,
        "out_topic": out_topic,
        "deadletter_topic": deadletter,
        "group": group,
        "redis_url": redis,
        "metrics_port": metrics_port,
        "eos": eos,
        "max_batch": max_batch,
        "handler_id": handler_id,
    }
    flags = {
        "bootstrap": "--bootstrap",
        "in_topic": "--in",
        "out_topic": "--out",
        "deadletter_topic": "--deadletter",
        "group": "--group",
        "redis_url": "--redis",
        "metrics_port": "--metrics-port",
        "eos": "--eos",
        "max_batch": "--max-batch",
        "handler_id": "--id",
    }
    try:
        settings = HandlerSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        _fail_settings(e, flags)
        return

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


# --- verify -------------------------------------------------------------------------------


@app.command()
def verify(
    manifest: Annotated[Path | None, typer.Option(help="manifest written by replay")] = None,
    source: Annotated[
        Path | None,
        typer.Option(help="or: the replayed file (ITCH or JSON lines); expectations come from it"),
    ] = None,
    day: Annotated[
        str | None, typer.Option("--date", help="--source ITCH: trading date, as given to replay")
    ] = None,
    from_: Annotated[
        str | None, typer.Option("--from", help="--source: as given to replay")
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="--source: as given to replay")] = None,
    only: Annotated[str | None, typer.Option(help="--source: as given to replay")] = None,
    bootstrap: Annotated[str, typer.Option(help="Kafka HOST:PORT")] = "127.0.0.1:9092",
    topic: Annotated[str, typer.Option(help="tick topic")] = c.TICKS_TOPIC,
    raw_topic: Annotated[
        str, typer.Option(help="--source: raw topic (market-wide dead letters, one per partition)")
    ] = c.RAW_TOPIC,
    deadletter_topic: Annotated[
        str | None, typer.Option(help="dead-letter topic to account for ('' = skip)")
    ] = c.DEADLETTER_TOPIC,
    timeout: Annotated[
        float, typer.Option(help="wait up to N s for all expected ticks (0 = read what is there)")
    ] = 0.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write results as JSON")] = None,
) -> None:
    """Check md.ticks against a manifest, or against the source file itself: missing,
    duplicated, reordered, checksums, dead letters."""
    import orjson

    from ingest.manifest import Manifest
    from ingest.verify import run_verify

    if (manifest is None) == (source is None):
        typer.echo("error: give either --manifest or --source", err=True)
        raise typer.Exit(2)
    expected_dls = None
    if source is not None:
        exp = _expect_from_source(source, day, from_, to, only)
        if any(d.broadcast for d in exp.deadletters):
            from core.topology import partitions_of

            try:
                exp.set_partitions(len(asyncio.run(partitions_of(bootstrap, raw_topic))))
            except RuntimeError as e:
                typer.echo(f"error: --raw-topic: {e}", err=True)
                raise typer.Exit(2) from None
        else:
            exp.set_partitions(1)
        m = exp.manifest
        expected_dls = exp.deadletters
    else:
        assert manifest is not None
        if not manifest.exists():
            raise typer.BadParameter(f"{manifest} does not exist", param_hint="--manifest")
        m = Manifest.read(manifest)
    res = run_verify(
        bootstrap,
        topic,
        m,
        deadletter_topic or None,
        timeout_s=timeout,
        expected_deadletters=expected_dls,
    )
    for sym, d in list(res.per_symbol.items())[:20]:
        typer.echo(f"{sym}: {d}")
    if len(res.per_symbol) > 20:
        typer.echo(f"... {len(res.per_symbol) - 20} more symbols with problems")
    typer.echo(
        f"ticks read={res.ticks_read} expected={res.ticks_expected} "
        f"symbols={len(m.symbols)} unexpected_symbols={res.unexpected_symbols}"
    )
    for dl in (res.deadletter_spans or [])[:50]:
        typer.echo(dl.line())
    if res.deadletters is not None:
        typer.echo(f"deadletters={res.deadletters} expected={res.deadletters_expected}")
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(res.to_dict(), option=orjson.OPT_INDENT_2))
    typer.echo(res.summary_line())
    if not res.ok:
        raise typer.Exit(1)


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
) -> None:
    """Create md.raw, md.ticks and md.deadletter if they do not exist."""
    from core.topology import create_topics

    ticks = ticks_partitions or raw_partitions
    asyncio.run(create_topics(bootstrap, raw_partitions, ticks, replication))
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
def up(
    full_day: Annotated[
        bool,
        typer.Option(
            "--full-day",
            help="the longer day on the standard ports (9092, 6379): --speed 60 by default, "
            "about 16 minutes; without it, a day compressed into about two minutes with a "
            "live view and an HTML report",
        ),
    ] = False,
    seed: Annotated[int, typer.Option()] = 1,
    day: Annotated[str | None, typer.Option("--date")] = None,
    out: Annotated[
        Path | None, typer.Option(help="compressed day: where its report and logs go")
    ] = None,
    symbols: Annotated[int | None, typer.Option(min=1, help="--full-day: instruments [50]")] = None,
    speed: Annotated[str | None, typer.Option(help="--full-day: number or max [60]")] = None,
    handlers: Annotated[
        int | None, typer.Option(min=1, help="--full-day: handlers (the scaler's minimum) [2]")
    ] = None,
    max_handlers: Annotated[
        int | None, typer.Option(min=1, help="--full-day: the scaler's maximum [4]")
    ] = None,
    scaler: Annotated[
        bool | None,
        typer.Option(help="--full-day: let the scaler run the handlers (off: a fixed fleet)"),
    ] = None,
    from_: Annotated[str | None, typer.Option("--from", help="--full-day: start HH:MM")] = None,
    to: Annotated[str | None, typer.Option("--to", help="--full-day: end HH:MM")] = None,
    partitions: Annotated[
        int | None, typer.Option(min=1, help="--full-day: md.raw partitions [12]")
    ] = None,
    kafka_port: Annotated[int | None, typer.Option(help="--full-day [9092]")] = None,
    redis_port: Annotated[int | None, typer.Option(help="--full-day [6379]")] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="--full-day: broker and Redis data [.local/up]")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="--full-day: first handler's metrics port [9100]")
    ] = None,
    scaler_port: Annotated[
        int | None, typer.Option(help="--full-day: the scaler's metrics port [9200]")
    ] = None,
    reset: Annotated[
        bool,
        typer.Option(
            help="--full-day: reset a broker or Redis already listening on the port (delete "
            "its md.* topics, the handlers' consumer group, the book snapshots) instead of "
            "refusing"
        ),
    ] = False,
) -> None:
    """Run the whole pipeline on this machine: Kafka, Redis, the scaler and its handlers,
    a replayed day, verified."""
    from rich.console import Console

    full = {
        "--symbols": symbols, "--speed": speed, "--handlers": handlers,
        "--max-handlers": max_handlers, "--scaler": scaler, "--from": from_, "--to": to,
        "--partitions": partitions, "--kafka-port": kafka_port, "--redis-port": redis_port,
        "--state-dir": state_dir, "--metrics-port": metrics_port, "--scaler-port": scaler_port,
        "--reset": reset or None,
    }  # fmt: skip
    if not full_day:
        given = [k for k, v in full.items() if v is not None]
        if given:
            raise _fail(given[0], "applies to the longer day only: add --full-day")
        from tickscale.quickday import run_quick_day

        # A log is no terminal: one ledger line there, not one folded into 80 columns.
        console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)
        raise typer.Exit(run_quick_day(seed, day, out, console))
    if out is not None:
        raise _fail("--out", "applies to the compressed day only (--full-day uses --state-dir)")
    from tickscale.up import run_up

    rc = run_up(
        symbols=50 if symbols is None else symbols,
        speed=_speed(speed or "60"),
        handlers=2 if handlers is None else handlers,
        seed=seed,
        day=day,
        start=from_,
        end=to,
        partitions=12 if partitions is None else partitions,
        kafka_port=9092 if kafka_port is None else kafka_port,
        redis_port=6379 if redis_port is None else redis_port,
        state_dir=state_dir or Path(".local/up"),
        scaler=True if scaler is None else scaler,
        max_handlers=4 if max_handlers is None else max_handlers,
        metrics_base_port=9100 if metrics_port is None else metrics_port,
        scaler_port=9200 if scaler_port is None else scaler_port,
        reset=reset,
    )
    raise typer.Exit(rc)
