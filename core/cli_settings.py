"""Command-line options generated from a pydantic-settings model.

Each setting is declared once, in its process's model: type, default, bounds and help. A
command decorated with ``options_from(Model)`` gets one flag per field (``--name`` from the
field's name, without a trailing ``_s`` unit; ``Field(json_schema_extra={"flag": "--x"})``
renames it) and receives only the flags the user gave, so the model's own sources (its
environment variables, then its defaults) fill in the rest. ``load`` builds the model and turns
a validation error into one line naming the flag, exit status 2.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

M = TypeVar("M", bound=BaseModel)

# A flag's value reaches pydantic as typed here; pydantic then applies the field's own type
# and bounds, so a Literal or a constrained number is checked once, in the model.
_PLAIN = (str, int, float, bool, Path)


def flag_of(name: str, field: FieldInfo) -> str:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("flag"), str):
        return str(extra["flag"])
    return "--" + name.removesuffix("_s").replace("_", "-")


def _cli_type(annotation: Any) -> Any:
    """The type a flag parses to: the field's type without ``None``; a Literal is a string."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _cli_type(args[0])
    if origin is typing.Literal:
        return type(args[0])
    if origin is list and args and args[0] in _PLAIN:
        return list[args[0]]  # type: ignore[valid-type]
    if annotation in _PLAIN:
        return annotation
    raise TypeError(f"no flag for a setting of type {annotation!r}")


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    if field.is_required():
        return f"{text} (required)" if text else "(required)"
    if field.default_factory is None and field.default not in (None, "", [], False):
        default = field.default
        text = f"{text} (default {default})" if text else f"(default {default})"
    return text


def _choices(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _choices(args[0])
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(str(a) for a in args)
    return ""


def has_flag(field: FieldInfo) -> bool:
    """A mapping (e.g. file name -> host path) has no flag: it is set by environment (JSON)."""
    try:
        _cli_type(field.annotation)
    except TypeError:
        return False
    return True


def options(model: type[BaseModel], exclude: Iterable[str] = ()) -> list[inspect.Parameter]:
    """One keyword-only parameter per field of ``model`` that has a flag, each a typer option
    defaulting to None (not given)."""
    skip = set(exclude)
    params = []
    for name, field in model.model_fields.items():
        if name in skip or not has_flag(field):
            continue
        help_ = " ".join(p for p in (_choices(field.annotation), _help(field)) if p)
        typ = _cli_type(field.annotation)
        flag = flag_of(name, field)
        if typ is bool:  # both ways: a flag must be able to undo its variable or default
            flag = f"{flag}/--no-{flag.removeprefix('--')}"
        opt = typer.Option(flag, help=help_, show_default=False)
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None,
                annotation=Annotated[typing.Optional[typ], opt],  # noqa: UP045 (typer's flags)
            )
        )  # fmt: skip
    return params


def options_from(
    model: type[BaseModel], exclude: Iterable[str] = (), extra: Iterable[inspect.Parameter] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate ``fn(ctx: typer.Context, given: dict[str, Any], **extra)``: typer sees one
    option per setting (plus ``extra``, parameters of the command that are not settings);
    ``fn`` receives the settings the user gave as ``given``."""
    extra = list(extra)

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        ctx_param = inspect.Parameter(
            "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
        )
        params = [ctx_param, *extra, *options(model, exclude)]
        extra_names = {p.name for p in extra}

        @functools.wraps(fn)
        def command(ctx: typer.Context, **kw: Any) -> Any:
            given = {
                k: v for k, v in kw.items() if k not in extra_names and v not in (None, [], ())
            }
            return fn(ctx, given, **{k: kw[k] for k in extra_names})

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read this signature, not fn's
        return command

    return wrap


def load(model: type[M], given: dict[str, Any], **fixed: Any) -> M:
    """``model`` from the flags given (and ``fixed`` values a command sets itself), the rest
    from its environment variables and defaults; invalid: one line per error naming the flag,
    exit status 2."""
    try:
        return model(**fixed, **given)
    except ValidationError as e:
        fields = model.model_fields
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else ""
            if name not in fields:  # a check across settings: name the first one it mentions
                name = next((f for f in fields if f in err["msg"]), name)
            flag = flag_of(name, fields[name]) if name in fields else name or "settings"
            msg = str(err["msg"]).removeprefix("Value error, ")
            typer.echo(f"error: invalid setting {flag}: {msg}", err=True)
        raise typer.Exit(2) from None


def to_args(settings: BaseModel) -> list[str]:
    """The flags that give a command ``settings`` (the fields set explicitly): how one
    process starts another with settings it built and validated itself."""
    fields = type(settings).model_fields
    args: list[str] = []
    for name in sorted(settings.model_fields_set, key=list(fields).index):
        if not has_flag(fields[name]):
            continue  # a mapping: the child reads it from the environment it inherits
        value = getattr(settings, name)
        flag = flag_of(name, fields[name])
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag.removeprefix('--')}")
        elif isinstance(value, list):
            for v in value:
                args += [flag, str(v)]
        elif value is not None:
            args += [flag, str(value)]
    return args
