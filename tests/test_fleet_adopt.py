"""A dead scaler costs nothing: its handlers keep consuming, and the next scaler on the
same state directory adopts them (process backend, real broker, real processes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from scaler.backends.base import HandlerSpec
from scaler.backends.fleetfile import Entry, FleetFile, Record, alive, start_ticks
from scaler.backends.process import ProcessBackend
from tests.pipeline_utils import holding, run_replay, run_verify, summary
from tickscale.localstack.net import free_port
from tickscale.localstack.topics import TopicSet


class Scaler:
    """``tickscale scaler --backend process`` on a shared state directory."""

    def __init__(self, ts: TopicSet, redis_url: str, state: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.log_path = log
        cmd = [
            sys.executable, "-m", "tickscale", "scaler",
            "--backend", "process", "--bootstrap", ts.bootstrap, "--redis-url", redis_url,
            "--topic", ts.raw, "--group", ts.group, "--metrics-port", str(self.port),
            "--state-dir", str(state), "--poll", "0.5", "--calendar", "none",
            "--lease-ttl", "3", *args,
        ]  # fmt: skip
        env = os.environ | {
            "TICKSCALE_SCALER_OUT_TOPIC": ts.ticks,
            "TICKSCALE_SCALER_DEADLETTER_TOPIC": ts.deadletter,
        }
        with log.open("ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    async def until(self, name: str, want: float, within_s: float = 120) -> None:
        deadline = time.monotonic() + within_s
        while (v := await asyncio.to_thread(self.metric, name)) != want:
            assert self.proc.poll() is None, self.log()[-4000:]
            assert time.monotonic() < deadline, f"{name}={v}\n{self.log()[-4000:]}"
            await asyncio.sleep(0.5)


def _fleet(state: Path, name: str) -> list[Entry]:
    return FleetFile(state, name).read().handlers


async def _until(pred: Callable[[], bool], within_s: float, what: Callable[[], object]) -> None:
    deadline = time.monotonic() + within_s
    while not pred():
        assert time.monotonic() < deadline, what()
        await asyncio.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("topics", [2], indirect=True)
async def test_handlers_outlive_a_killed_scaler_and_the_next_one_adopts_them(
    topics: TopicSet, redis_url: str, tmp_path: Path
) -> None:
    name = f"adopt{os.getpid()}{int(time.time()) % 100000}"
    state = tmp_path / "scaler"
    args = ("--name", name, "--handler-base-port", str(free_port()))
    first = Scaler(topics, redis_url, state, tmp_path / "first.log", *args,
                   "--min-handlers", "2", "--max-handlers", "2")  # fmt: skip
    second: Scaler | None = None
    try:
        await first.until("tickscale_scaler_running_handlers", 2)
        handlers = _fleet(state, name)
        logs = [state / "logs" / f"{h.name}.log" for h in handlers]
        await _until(lambda: all("assigned" in p.read_text() for p in logs), 120,
                     lambda: [p.read_text()[-2000:] for p in logs])  # fmt: skip

        first.proc.kill()
        first.proc.wait(10)
        # Long past the second in which a handler that followed its scaler would leave.
        await asyncio.sleep(5)
        assert all(alive(h) for h in handlers), [p.read_text()[-2000:] for p in logs]

        # Still consuming, with no scaler at all: every tick of a replayed minute arrives.
        manifest = tmp_path / "manifest.json"
        await asyncio.to_thread(run_replay, topics, manifest, "--symbols", "5",
                                "--from", "09:30", "--to", "09:31", "--speed", "max")  # fmt: skip
        rc, out = await asyncio.to_thread(run_verify, topics, manifest, 120)
        assert rc == 0 and summary(out)["missing"] == 0, out[-3000:]
        assert all(alive(h) for h in handlers)

        # The next scaler (a fleet of at most one) adopts both, starts none, and scales
        # the adopted fleet down by one: SIGTERM to a process it is not the parent of.
        second = Scaler(
            topics, redis_url, state, tmp_path / "second.log", *args,
            "--min-handlers", "1", "--max-handlers", "1", "--scale-down-window", "5",
        )  # fmt: skip
        await _until(lambda: "adopted 2 running handler(s)" in second.log(), 60, second.log)
        await second.until("tickscale_scaler_running_handlers", 1, within_s=180)
        left = _fleet(state, name)
        assert len(left) == 1 and left[0] in handlers, (left, handlers)
        gone = next(h for h in handlers if h != left[0])
        assert not alive(gone)
        gone_log = (state / "logs" / f"{gone.name}.log").read_text()
        assert "stopped after" in gone_log, gone_log[-2000:]  # drained and left the group
        assert not re.search(r"started handler-\S+ \(pid", second.log()), second.log()[-4000:]
        assert "did not stop within" not in second.log()

        # Stopped in order, the scaler stops the handler it adopted.
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(120) == 0, second.log()[-4000:]
        assert not alive(left[0])
        assert _fleet(state, name) == []
        last_log = (state / "logs" / f"{left[0].name}.log").read_text()
        assert "stopped after" in last_log, last_log[-2000:]
    finally:
        for s in (first, second):
            if s is not None and s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait(10)
        for h in _fleet(state, name):  # never leave a handler consuming
            if alive(h):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(h.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("topics", [2], indirect=True)
async def test_a_standby_takes_over_the_fleet_of_a_killed_leader(
    topics: TopicSet, redis_url: str, tmp_path: Path
) -> None:
    """The standby shares its leader's state directory: when the leader is SIGKILLed and
    the lease passes to it, the fleet it counts is the leader's, and it starts nothing."""
    name = f"standby{os.getpid()}{int(time.time()) % 100000}"
    state = tmp_path / "scaler"
    args = ("--name", name, "--handler-base-port", str(free_port()),
            "--min-handlers", "2", "--max-handlers", "2")  # fmt: skip
    leader = Scaler(topics, redis_url, state, tmp_path / "a.log", *args, "--id", "a")
    standby: Scaler | None = None
    try:
        await leader.until("tickscale_scaler_running_handlers", 2)
        await leader.until("tickscale_scaler_leader", 1)
        handlers = _fleet(state, name)
        standby = Scaler(topics, redis_url, state, tmp_path / "b.log", *args, "--id", "b")
        await standby.until("tickscale_scaler_leader", 0)
        await standby.until("tickscale_scaler_running_handlers", 2)
        leader.proc.kill()
        leader.proc.wait(10)
        await standby.until("tickscale_scaler_leader", 1, within_s=60)
        await asyncio.sleep(3)  # a few polls as the leader
        assert standby.metric("tickscale_scaler_running_handlers") == 2
        assert _fleet(state, name) == handlers and all(alive(h) for h in handlers)
        assert not re.search(r"started handler-\S+ \(pid", standby.log()), standby.log()[-4000:]
        standby.proc.send_signal(signal.SIGTERM)  # the new leader stops the fleet it took over
        assert standby.proc.wait(120) == 0, standby.log()[-4000:]
        assert not any(alive(h) for h in handlers) and _fleet(state, name) == []
    finally:
        for s in (leader, standby):
            if s is not None and s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait(10)
        for h in _fleet(state, name):
            if alive(h):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(h.pid, signal.SIGKILL)


async def test_a_recorded_pid_now_used_by_another_process_is_not_adopted(tmp_path: Path) -> None:
    """The kernel reuses pids: a record whose pid now names a different process (another
    start time) must be dropped, never counted, signalled or stopped."""
    me = os.getpid()
    ticks = start_ticks(me)
    assert ticks is not None
    record = FleetFile(tmp_path, "f")
    stale = Entry(me, 0, "handler-f-1", 9300, time.time() - 60, ticks - 1)
    record.write(Record(2, [stale]))
    spec = HandlerSpec("127.0.0.1:9092", "md.raw", "md.ticks", "md.deadletter", "g", None)
    backend = ProcessBackend(spec, state_dir=tmp_path, name="f")
    await backend.start()
    assert await backend.list() == []
    assert await backend.remove(1) == []  # and this process received no SIGTERM
    assert record.read() == Record(2, [])  # names are not reused either


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def _children(parent: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if d.name.isdigit() and _ppid(int(d.name)) == parent:
                out.append(int(d.name))
    return out


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@contextlib.asynccontextmanager
async def _up_with_one_handler(
    tmp_path: Path,
) -> AsyncIterator[tuple[subprocess.Popen[bytes], Path, Entry, int]]:
    """`tickscale up` with one handler assigned: (up, its state dir, the handler, the
    pids of its scaler and keeper). Whatever the test leaves running is killed at the end."""
    state = tmp_path / "up"
    out = tmp_path / "up.out"
    with out.open("wb") as f:
        up = subprocess.Popen(
            [sys.executable, "-m", "tickscale", "up", "--full-day", "--symbols", "5",
             "--from", "09:27",
             "--to", "10:30", "--speed", "1", "--handlers", "1", "--max-handlers", "1",
             "--partitions", "2",
             "--kafka-port", str(free_port()), "--redis-port", str(free_port()),
             "--metrics-port", str(free_port()), "--scaler-port", str(free_port()),
             "--state-dir", str(state)],
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        await _until(lambda: len(_fleet(state / "scaler", "default")) == 1, 180, out.read_text)
        (handler,) = _fleet(state / "scaler", "default")
        hlog = state / "scaler" / "logs" / f"{handler.name}.log"
        await _until(lambda: "assigned" in hlog.read_text(), 120, hlog.read_text)
        keeper = _ppid(handler.pid)
        assert "tickscale.keeper" in _cmdline(keeper), _cmdline(keeper)
        (scaler,) = [p for p in _children(keeper) if p != handler.pid]
        assert "tickscale scaler" in _cmdline(scaler)
        yield up, state, handler, scaler, keeper
    finally:
        if up.poll() is None:
            up.kill()
        for pid in holding(state):  # never leave a broker or handler behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
async def test_under_up_a_killed_scaler_is_started_again_and_adopts_the_handler(
    tmp_path: Path,
) -> None:
    """`up`'s handlers follow its stack owner (the keeper), not the scaler: a SIGKILLed
    scaler is started again and adopts the handler that kept running."""
    async with _up_with_one_handler(tmp_path) as (up, state, handler, scaler, _):
        scaler_log = state / "logs" / "scaler.log"
        hlog = state / "scaler" / "logs" / f"{handler.name}.log"
        os.kill(scaler, signal.SIGKILL)

        await _until(lambda: scaler_log.read_text().count("adopted 1 running handler") == 1,
                     120, lambda: scaler_log.read_text()[-4000:])  # fmt: skip
        assert alive(handler) and _fleet(state / "scaler", "default") == [handler]
        assert "parent process" not in hlog.read_text()
        assert up.poll() is None

        up.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(up.wait, 180) == 130
        assert not alive(handler)
        assert "stopped after" in hlog.read_text(), hlog.read_text()[-2000:]


@pytest.mark.slow
async def test_a_keeper_stopped_while_its_scaler_is_down_still_stops_the_handler(
    tmp_path: Path,
) -> None:
    """A stop that finds no scaler to stop the fleet (killed, not yet started again): the
    keeper drains the handlers itself, so `up` never returns with one still running."""
    async with _up_with_one_handler(tmp_path) as (_, state, handler, scaler, keeper):
        hlog = state / "scaler" / "logs" / f"{handler.name}.log"
        os.kill(scaler, signal.SIGKILL)
        os.kill(keeper, signal.SIGTERM)  # within its second before it starts another
        await _until(lambda: not alive(handler), 60, lambda: hlog.read_text()[-2000:])
        assert "stopped after" in hlog.read_text(), hlog.read_text()[-2000:]
        keeper_log = (state / "logs" / "scaler.log").read_text()
        assert "stopping 1 handler(s) the scaler left running" in keeper_log, keeper_log
        assert "starting it again" not in keeper_log
