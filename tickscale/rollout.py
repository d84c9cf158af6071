"""``tickscale rollout``: ask the running scaler for a handler rollout and follow it.

The command changes no handler itself. It leaves a request (or an abort) in
Redis beside the fleet's rollout state, then follows the scaler's audit stream
until the rollout ends: exit 0 when promoted, 1 when rolled back (the reason on
the last line), 2 when refused or mistyped.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import shlex
import sys
import time
from typing import Annotated, Any

import typer
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.constants import REDIS_SCALER_EVENTS, REDIS_SCALER_LEASE
from core.retry import retry_async
from core.secrets import client_secrets

log = logging.getLogger(__name__)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def rollout(
    image: Annotated[str | None, typer.Option(help="docker: the new handler image")] = None,
    command: Annotated[
        str | None, typer.Option(help="process backend: the new handler's command line")
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="the new version's name (the image, or cmd-{hash})")
    ] = None,
    guard: Annotated[
        str, typer.Option(help="guard thresholds, key=value,... (e.g. window_s=60)")
    ] = "",
    abort: Annotated[bool, typer.Option(help="roll back the rollout in progress")] = False,
    name: Annotated[
        str | None, typer.Option(help="the scaler's fleet name [TICKSCALE_SCALER_NAME]")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="the scaler's Redis [TICKSCALE_SCALER_REDIS_URL]")
    ] = None,
    timeout: Annotated[float, typer.Option(help="stop following after this long, s")] = 3600,
) -> None:
    """Roll out a new handler version: a canary, a guard, then promotion or rollback."""
    from scaler.backends.base import HandlerVersion
    from scaler.guard import GuardConfig, GuardError
    from scaler.rollout_state import RolloutRequest

    if abort == bool(image or command) or (image and command):
        _fail("give one of --image IMAGE, --command '...' or --abort")
    try:
        GuardConfig.parse(guard)
    except GuardError as e:
        _fail(f"--guard: {e}")
    req = None
    if not abort:
        argv = tuple(shlex.split(command)) if command else None
        if command is not None and not argv:
            _fail("--command: empty command line")
        digest = hashlib.sha1(" ".join(argv or ()).encode()).hexdigest()[:8]
        vname = version or image or f"cmd-{digest}"
        req = RolloutRequest(HandlerVersion(vname, image, argv), guard)
    url, fleet = _scaler_defaults(redis_url, name)
    code = asyncio.run(_run(url, fleet, req, timeout))
    raise typer.Exit(code)


def _scaler_defaults(redis_url: str | None, name: str | None) -> tuple[str, str]:
    """What the scaler itself would use (its TICKSCALE_SCALER_* variables), unless given:
    inside the scaler's container the command needs no options."""
    from pydantic import ValidationError

    from scaler.settings import ScalerSettings

    given = {k: v for k, v in (("redis_url", redis_url), ("name", name)) if v is not None}
    try:
        s = ScalerSettings(**given)  # type: ignore[arg-type]
    except ValidationError as e:
        err = e.errors()[0]
        where = {"redis_url": "--redis-url", "name": "--name"}.get(str(err["loc"][0]), "")
        _fail(f"{where or 'TICKSCALE_SCALER_' + str(err['loc'][0]).upper()}: {err['msg']}")
        raise
    return s.redis_url, s.name


async def _run(url: str, fleet: str, req: Any, follow_s: float) -> int:
    from scaler.rollout_state import RolloutStore

    # The scaler's Redis with this process's password file, as the scaler itself reaches it
    # (the stack's Redis wants it; the url shown in errors stays without it).
    redis = Redis.from_url(
        client_secrets().redis_url(url), socket_timeout=10, socket_connect_timeout=5
    )
    try:
        store = RolloutStore(redis, fleet)
        st = await store.load()
        if req is None:
            if not st.active:
                _fail(f"no rollout in progress for fleet {fleet!r}")
            await store.abort(st.id)
            rollout_id, since = st.id, "0-0"
        else:
            if st.active:
                _fail(f"rollout {st.id} of {(st.target or {}).get('name')} is in progress "
                      "(tickscale rollout --abort stops it)")  # fmt: skip
            since = await _last_id(redis, f"{REDIS_SCALER_EVENTS}:{fleet}")
            if not await store.request(req):
                _fail(f"another rollout request for fleet {fleet!r} waits for the scaler")
            rollout_id = req.id
            typer.echo(f"rollout {rollout_id}: requested {req.version.name}")
        if not await redis.exists(f"{REDIS_SCALER_LEASE}:{fleet}"):
            typer.echo(f"note: no scaler leads fleet {fleet!r} now; the request waits for one")
        return await _follow(redis, f"{REDIS_SCALER_EVENTS}:{fleet}", rollout_id, since, follow_s)
    except (RedisError, OSError) as e:
        _fail(f"--redis-url: cannot reach Redis at {url}: {e}")
        return 2
    finally:
        await redis.aclose()


async def _last_id(redis: Redis, stream: str) -> str:
    last = await redis.xrevrange(stream, count=1)
    if not last:
        return "0-0"
    rid = last[0][0]
    return rid.decode() if isinstance(rid, bytes) else str(rid)


async def _follow(redis: Redis, stream: str, rollout_id: str, since: str, follow_s: float) -> int:
    """Print the rollout's events until it ends; its exit code."""
    from scaler.audit import decode_event

    deadline = time.monotonic() + follow_s
    while time.monotonic() < deadline:
        # Following is only reading: a Redis that stalls or drops the connection for a few
        # seconds (a busy machine) is waited out, not reported as the rollout's end.
        got: Any = await retry_async(
            functools.partial(redis.xread, {stream: since}, block=1000, count=100),
            what="read the audit stream",
            attempts=8,
            first_s=0.5,
            max_s=5.0,
            retry_on=lambda e: isinstance(e, RedisError | OSError),
            sleep=asyncio.sleep,
            log=log,
        )
        for _stream, entries in got or []:
            for rid, fields in entries:
                since = rid.decode() if isinstance(rid, bytes) else str(rid)
                e = decode_event(fields)
                if e["kind"] != "rollout" or e.get("rollout") != rollout_id:
                    continue
                stamp = time.strftime("%H:%M:%S", time.gmtime(e["time"]))
                reason = f": {e['reason']}" if e.get("reason") else ""
                typer.echo(f"{stamp} {e['event']} {e['version']}{reason}")
                if e["event"] == "promoted":
                    return 0
                if e["event"] == "rolled_back":
                    typer.echo(f"rolled back: {e['reason']}", err=True)
                    return 1
                if e["event"] == "rejected":
                    typer.echo(f"error: rollout refused: {e['reason']}", err=True)
                    return 2
    print("stopped following; the scaler carries on with the rollout", file=sys.stderr)
    return 1
