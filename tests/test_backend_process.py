"""The process backend's state directory: its Prometheus targets file written by two
scalers at once, and a full disk under it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from scaler.backends.base import BackendError, HandlerSpec
from scaler.backends.process import ProcessBackend
from tickscale.localstack.net import free_port


def test_two_backends_sharing_a_state_dir_write_targets_safely(tmp_path: Path) -> None:
    # A leader and its standby on one machine share the directory; each rewrites the
    # file whenever its fleet changes, so the writes can interleave.
    spec = HandlerSpec("127.0.0.1:9092", "md.raw", "md.ticks", "md.deadletter", "g", None)
    backends = [ProcessBackend(spec, state_dir=tmp_path, name=n) for n in ("a", "b")]

    def write(i: int) -> None:
        backends[i % 2]._write_targets()

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, range(4000)))  # raises here if one write lost its file
    assert json.loads((tmp_path / "targets.json").read_text()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["targets.json"]  # no temporary left


def _running_handlers(fleet: str) -> list[int]:
    """Live processes started as handlers of ``fleet`` (by the id in their environment)."""
    found = []
    mark = f"TICKSCALE_HANDLER_HANDLER_ID=handler-{fleet}-".encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if mark in (d / "environ").read_bytes():
                    found.append(int(d.name))
    return found


async def test_a_full_state_dir_leaves_no_handler_running_unrecorded(small_disk: Path) -> None:
    """A handler the record does not hold runs on where no scaler can count, adopt or
    stop it, and the next scale-up starts another: on a full disk, each attempt left one
    more running (three after three). It is stopped again, and the error names the state
    directory."""
    spec = HandlerSpec(f"127.0.0.1:{free_port()}", "md.raw", "md.ticks", "md.deadletter", "g", None)
    fleet = f"full{os.getpid()}"
    backend = ProcessBackend(
        spec, base_port=free_port(), state_dir=small_disk, name=fleet, stop_grace_s=10
    )
    await backend.start()
    with (small_disk / "filler").open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    try:
        with pytest.raises(BackendError) as e:
            await backend.add(1)
        assert str(small_disk) in str(e.value) and "No space left" in str(e.value)
        assert await backend.list() == []
        assert _running_handlers(fleet) == []
        assert [n for n in os.listdir(small_disk) if n.endswith(".tmp")] == []  # none half written
        # Room again: the fleet grows as asked, recorded.
        (small_disk / "filler").unlink()
        ids = await backend.add(1)
        assert [h.id for h in await backend.list()] == ids
    finally:
        for pid in _running_handlers(fleet):
            os.kill(pid, signal.SIGKILL)


async def test_a_slot_whose_port_another_program_holds_is_skipped(tmp_path: Path) -> None:
    """A handler's metrics port is its slot's. Before, every handler started in a slot
    whose port another program listened on exited at once, and the fleet never grew."""
    spec = HandlerSpec(f"127.0.0.1:{free_port()}", "md.raw", "md.ticks", "md.deadletter", "g", None)
    base = free_port()
    fleet = f"port{os.getpid()}"
    backend = ProcessBackend(spec, base_port=base, state_dir=tmp_path, name=fleet, stop_grace_s=10)
    await backend.start()
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", base))
        other.listen()
        try:
            ids = await backend.add(1)
            await asyncio.sleep(3)  # a handler on a taken port is gone by then
            assert [h.id for h in await backend.list()] == ids
            targets = json.loads((tmp_path / "targets.json").read_text())
            assert [t["targets"] for t in targets] == [[f"127.0.0.1:{base + 1}"]]
        finally:
            await backend.remove(1)
            for pid in _running_handlers(fleet):
                os.kill(pid, signal.SIGKILL)


def test_slots_past_the_last_port_are_an_error_not_a_crash(tmp_path: Path) -> None:
    # No port can be bound on an address this machine does not have (TEST-NET-1).
    spec = HandlerSpec("127.0.0.1:1", "md.raw", "md.ticks", "md.deadletter", "g", None)
    backend = ProcessBackend(spec, base_port=65534, state_dir=tmp_path, host="192.0.2.1")
    with pytest.raises(BackendError, match="handler_base_port 65534: no free port"):
        backend._free_slots(set(), 1)
