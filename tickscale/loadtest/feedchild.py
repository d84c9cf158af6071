"""The load test's replay feed, run as a child process: started, followed, explained."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson
from rich.console import Console

from tickscale.loadtest.sampler import ReplayClock
from tickscale.loadtest.scenarios import ReplayPlan


async def start_feed(
    plan: ReplayPlan, bootstrap: str, topic: str, redis_url: str, out: Path
) -> asyncio.subprocess.Process:
    """The feed child: replays ``plan`` into ``topic``, its manifest and log in ``out``,
    and reports its progress as JSON lines on stdout (``read_feed``)."""
    cmd = [
        sys.executable, "-m", "tickscale.loadtest.feed", "--bootstrap", bootstrap,
        "--topic", topic, "--manifest", str(out / "manifest.json"),
        "--redis", redis_url, *plan.feed_args(),
    ]  # fmt: skip
    log_f = (out / "logs" / "replay.log").open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=log_f,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    finally:
        log_f.close()


async def read_feed(
    proc: asyncio.subprocess.Process, clock: ReplayClock, first: asyncio.Event, console: Console
) -> None:
    """Follow the feed's progress lines into ``clock``; ``first`` is set at its first message."""
    assert proc.stdout is not None
    async for line in proc.stdout:
        try:
            d = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if d.get("event") == "done":
            clock.done = d
            continue
        if d.get("event") == "prepared":
            console.print(f"replay prepared: {d['msgs']:,} messages; publishing")
            continue
        clock.add(float(d["wall"]), float(d["market"]))
        clock.msgs, clock.records = int(d["msgs"]), int(d["records"])
        first.set()


def feed_failure(out: Path, rc: int | None) -> str:
    """Why the feed failed: its own ``error:`` line (bad input) or where its log is."""
    log_path = out / "logs" / "replay.log"
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    said = [ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")]
    if said:
        return f"the replay refused its input (exit {rc}): {said[-1]}"
    return f"the replay feed failed (exit {rc}); see {log_path}"
