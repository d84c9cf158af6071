"""Usage errors as one line, like every other input error of tickscale.

The command-line library reports a bad flag (an unknown option, a value of the wrong type, a
choice that does not exist, a missing argument) as a usage block and a boxed panel of several
lines. Every other input error tickscale reports is one ``error:`` line naming the input, with
exit status 2, so a script or a log search catches both the same way. ``OneLineErrors`` is the
command group class of each ``typer.Typer`` here; only the outermost group's ``main`` runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup


def one_line(e: typer.TyperException) -> str:
    """The error as one line: what is wrong with which input, and where its help is."""
    text = " ".join(e.format_message().split()).rstrip(".")
    text = text[:1].lower() + text[1:]
    ctx = getattr(e, "ctx", None)  # usage errors carry the command they belong to
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {text}{where}"


class OneLineErrors(TyperGroup):
    """A command group whose usage errors print as one ``error:`` line, exit status 2."""

    def main(  # type: ignore[override]  # the library's signature, spelled out
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:  # the caller handles errors itself
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except typer.TyperException as e:
            _exit_with(e)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        # Not standalone, the library returns what an explicit exit carried (else None).
        sys.exit(code if isinstance(code, int) else 0)


def _exit_with(e: typer.TyperException) -> NoReturn:
    # A command called with no arguments where that shows its help: the help is printed
    # already, so only the status is left (named by class: the library does the same).
    if type(e).__name__ != "NoArgsIsHelpError":
        typer.echo(one_line(e), err=True)
    sys.exit(e.exit_code)
