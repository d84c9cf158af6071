"""The process backend's Prometheus targets file, written by two scalers at once."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scaler.backends.base import HandlerSpec
from scaler.backends.process import ProcessBackend


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
