"""Command-line options come from the settings models: one flag per setting, declared once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
import typer
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from typer.main import get_command
from typer.testing import CliRunner

from core.cli_settings import flag_of, has_flag, load, options_from, to_args
from ingest.handler.settings import HandlerSettings
from ingest.replay.settings import ReplaySettings
from ingest.verify_settings import VerifySettings
from scaler.settings import ScalerSettings
from scaler.sim.settings import SimulateSettings
from tickscale.loadtest.settings import LoadTestSettings
from tickscale.up_settings import UpSettings


class _Demo(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_", extra="forbid")

    wait_s: float = Field(1.0, gt=0, description="how long")
    mode: Literal["a", "b"] = "a"
    loud: bool = True
    name: str = Field("x", json_schema_extra={"flag": "--id"})
    tags: list[str] = Field(default_factory=list)


def _demo_app(seen: list[_Demo]) -> typer.Typer:
    app = typer.Typer(add_completion=False)

    @app.command()
    @options_from(_Demo)
    def go(ctx: typer.Context, given: dict[str, Any]) -> None:
        seen.append(load(_Demo, given))

    return app


def _flags(cmd: Any) -> set[str]:
    return {o for p in cmd.params for o in p.opts if o != "--help"}


@pytest.mark.parametrize(
    ("model", "command"),
    [
        (ScalerSettings, ["scaler"]),
        (HandlerSettings, ["handler"]),
        (ReplaySettings, ["replay"]),
        (UpSettings, ["up"]),
        (LoadTestSettings, ["loadtest"]),
        (VerifySettings, ["verify"]),
        (SimulateSettings, ["scaler", "simulate"]),
    ],
)
def test_every_setting_has_its_flag(model: type[BaseSettings], command: list[str]) -> None:
    from tickscale.cli import app

    cmd: Any = get_command(app)
    for name in command:
        cmd = cmd.commands[name]
    flags = _flags(cmd)
    expected = {flag_of(n, f) for n, f in model.model_fields.items() if has_flag(f)}
    assert expected <= flags, expected - flags
    # Nothing but the settings: a flag the model does not declare would be a second place.
    assert flags == expected, flags - expected


def test_flags_win_and_the_environment_fills_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_MODE", "b")
    monkeypatch.setenv("DEMO_WAIT_S", "7")
    seen: list[_Demo] = []
    r = CliRunner().invoke(
        _demo_app(seen), ["--wait", "2.5", "--no-loud", "--id", "y", "--tags", "p", "--tags", "q"]
    )
    assert r.exit_code == 0, r.output
    assert seen[0].wait_s == 2.5  # the flag, over the environment
    assert seen[0].mode == "b"  # the environment, where no flag was given
    assert (seen[0].loud, seen[0].name, seen[0].tags) == (False, "y", ["p", "q"])
    r = CliRunner().invoke(_demo_app(seen), [])
    assert (seen[1].wait_s, seen[1].loud, seen[1].tags) == (7.0, True, [])


def test_an_invalid_value_names_its_flag_and_exits_2() -> None:
    r = CliRunner().invoke(_demo_app([]), ["--wait", "0", "--mode", "c"])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2, r.output
    assert lines[0].startswith("error: invalid setting --wait: ")
    assert lines[1].startswith("error: invalid setting --mode: ")


def test_settings_go_to_a_child_process_as_its_flags() -> None:
    sent = _Demo(wait_s=3.5, mode="b", loud=False, name="z", tags=["a", "b"])
    args = to_args(sent)
    assert args == [
        "--wait", "3.5", "--mode", "b", "--no-loud", "--id", "z", "--tags", "a", "--tags", "b"
    ]  # fmt: skip
    seen: list[_Demo] = []
    r = CliRunner().invoke(_demo_app(seen), args)
    assert r.exit_code == 0, r.output
    assert seen[0] == sent
    assert to_args(_Demo()) == []  # only what was set: the child keeps its own defaults


@pytest.mark.parametrize("command", [["up"], ["loadtest"]])
def test_an_output_directory_that_cannot_be_written_is_named_before_the_run(
    command: list[str], tmp_path: Path
) -> None:
    # A file where the directory should go, and a place nothing can be made (even by root).
    a_file = tmp_path / "taken"
    a_file.write_text("")
    for bad, why in (
        (a_file, f"{a_file} is a file, not a directory"),
        (
            Path("/proc/tickscale-out"),
            "cannot write into /proc/tickscale-out (No such file or directory)",
        ),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "tickscale", *command, "--out", str(bad)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip() == f"error: invalid setting --out: {why}"
    # One that can be is made, as the run would make it, and left empty.
    fresh = tmp_path / "a" / "b"
    assert UpSettings(out=fresh).out == fresh and fresh.is_dir() and not any(fresh.iterdir())


@pytest.mark.parametrize(
    ("command", "flag"),
    [(["verify"], "--json"), (["loadtest"], "--json"), (["scaler", "simulate"], "--plot")],
)
def test_a_result_file_that_cannot_be_written_is_named_before_the_run(
    command: list[str], flag: str, tmp_path: Path
) -> None:
    """The file a run writes when it ends is checked when the settings are read: a path
    that cannot take it fails in one line before any work (it used to end the run in a
    traceback, its results lost)."""
    a_file = tmp_path / "taken"
    a_file.write_text("")
    for bad, why in (
        (a_file / "out", f"{a_file} is a file, not a directory"),
        (tmp_path, f"{tmp_path} is a directory; give a file path"),
        (Path("/proc/tickscale-out/r"), "cannot write into /proc/tickscale-out"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "tickscale", *command, flag, str(bad)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.startswith(f"error: invalid setting {flag}: {why}"), r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    # A folder that can be made is made, as the run needs it, and the file left unwritten.
    fresh = tmp_path / "a" / "r.json"
    assert VerifySettings(manifest=Path("m.json"), json_out=fresh).json_out == fresh
    assert fresh.parent.is_dir() and not fresh.exists()


def _commands(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name, sub in getattr(cmd, "commands", {}).items():
        found += _commands(sub, (*path, name))
    return found


def test_every_help_page_renders_its_text_whole() -> None:
    """Each command's --help renders; no setting shows pydantic's placeholder for "no
    default"; text in brackets or braces survives the markup; the command lists give each
    command one sentence."""
    from tickscale.cli import app

    runner = CliRunner()
    pages = {}
    for path in _commands(get_command(app)):
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, (path, r.output)
        pages[path] = r.output
        assert "PydanticUndefined" not in r.output, path
    assert "(required)" in pages[("replay",)]
    assert "[host-pid]" in pages[("handler",)] and "[host-pid]" in pages[("scaler",)]
    assert ".local/loadtest/{run}" in pages[("loadtest",)]
    assert "cmd-{hash}" in pages[("rollout",)]
    listing = pages[()].splitlines()
    for name in ("replay", "handler", "verify", "up"):
        (line,) = [ln for ln in listing if ln.strip("│ ").startswith(f"{name} ")]
        assert line.rstrip("│ ").endswith("."), line


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["loadtest", "--session-min", "open=x"], "--session-min: expected an integer in 'open=x'"),
        (["loadtest", "--rollout-guard", "bogus=1"], "--rollout-guard: 'bogus=1': expected"),
        (
            ["up", "--full-day", "--handlers", "3", "--max-handlers", "1"],
            "--handlers: handlers (3)",
        ),
        (
            ["up", "--full-day", "--state-dir", "/proc/tickscale-up"],
            "--state-dir: cannot write into /proc/tickscale-up",
        ),
        (
            ["loadtest", "--target", "compose", "--compose-env", "/nonexistent/.env"],
            "--compose-env: /nonexistent/.env not found: copy compose/.env.example to it",
        ),
    ],
)
def test_settings_a_run_needs_are_checked_before_it_starts(args: list[str], line: str) -> None:
    """A load test's or up's options for its scaler are checked when read, as the scaler
    checks them, and so is the file a compose run reads its addresses from: one line,
    exit 2, before any stack starts (they used to surface as a traceback once the stack
    was up, a scaler that would not start, or exit 1)."""
    r = subprocess.run(
        [sys.executable, "-m", "tickscale", *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: invalid setting {line}"), r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
