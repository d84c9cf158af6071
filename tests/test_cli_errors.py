"""A flag the command-line library itself rejects is one `error:` line, exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tickscale", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "names", "help_of"),
    [
        (["loadtest", "--scenario", "nope"], ["--scenario", "'nope'"], "tickscale loadtest"),
        (
            ["topics", "--raw-partitions", "0"],
            ["--raw-partitions", "greater than"],
            "tickscale topics",
        ),
        (["verify", "--timeout", "abc"], ["--timeout", "valid number"], "tickscale verify"),
        (["replay", "--nope"], ["no such option: --nope"], "tickscale replay"),
        (["replay", "extra"], ["unexpected extra argument", "extra"], "tickscale replay"),
        (["scaler", "simulate", "--seed", "x"], ["--seed"], "tickscale scaler simulate"),
        (["bogus"], ["no such command 'bogus'"], "tickscale"),
        (["--log-level", "loud", "topics"], ["--log-level", "'loud'"], "tickscale"),
    ],
)
def test_a_rejected_flag_is_one_line_naming_it_and_its_help(
    args: list[str], names: list[str], help_of: str
) -> None:
    r = _run(*args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), r.stderr
    for name in names:
        assert name in lines[0], r.stderr
    assert lines[0].endswith(f"(see '{help_of} --help')"), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_help_and_a_bare_command_still_show_the_help() -> None:
    r = _run("--help")
    assert r.returncode == 0 and "Usage: tickscale" in r.stdout, r.stderr
    r = _run()  # no command: the help, and the status of a usage error
    assert r.returncode == 2 and "Usage: tickscale" in r.stdout, r.stderr
    assert "error:" not in r.stderr
