"""Typer options made from a config dataclass's fields (trainer/config.py), plus ``--config FILE``.

Each field carries its help and spellings (:class:`trainer.config.Opt`); here they become one
``typer.Option`` each, in the dataclass's order, so `plora train` and `plora eval` take exactly the
fields of TrainConfig and EvalOptions. ``--config`` is read first (an eager option) into click's
``default_map``: a value in the file takes the place of the option's default, and a flag on the
command line overrides both.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from parallel.errors import PloraError
from trainer.config import cli_flag, cli_opt
from trainer.configfile import read_config

F = TypeVar("F", bound=Callable[..., Any])
PANEL = "Config file"


def _is_list(hint: Any) -> bool:
    return typing.get_origin(hint) is list or any(typing.get_origin(a) is list for a in typing.get_args(hint))


def option(f: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    """The annotation and ``typer.Option`` of one field; a list is given comma-separated."""
    o = cli_opt(f)
    flag = cli_flag(f)
    if hint is bool and f.default is True and "/" not in flag:
        flag += "/--no-" + flag[2:]  # on by default: the flag that turns it off
    default = ... if f.default is dataclasses.MISSING else f.default
    info = typer.Option(default, flag, *o.aliases, help=o.help, rich_help_panel=o.panel)
    return (str | None if _is_list(hint) else hint), info


def option_of(cls: type, name: str) -> Any:
    """One field's ``typer.Option``, for a command that takes only some of them (generate, export)."""
    (f,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return option(f, typing.get_type_hints(cls)[name])[1]


def _config_option(cls: type) -> Any:
    def load(ctx: typer.Context, value: Path | None) -> Path | None:
        if value is not None:
            given = read_config(value, cls)
            hints = typing.get_type_hints(cls)
            ctx.default_map = {
                **(ctx.default_map or {}),
                **{name: _as_flag_value(v, hints[name]) for name, v in given.items()},
            }
        return value

    return typer.Option(
        None,
        "--config",
        is_eager=True,
        callback=load,
        rich_help_panel=PANEL,
        help="YAML or TOML file of options (keys: the option names); flags given here override it.",
    )


def _as_flag_value(value: Any, hint: Any) -> Any:
    """A config file's value as the command line would give it: a list comma-separated."""
    return ",".join(map(str, value)) if _is_list(hint) and value is not None else value


PRINT_CONFIG = typer.Option(
    False,
    "--print-config",
    rich_help_panel=PANEL,
    help="Print the effective config (as --config reads it) and exit.",
)


def from_fields(cls: type, *extra: inspect.Parameter) -> Callable[[F], F]:
    """Give a command ``def command(**given)`` one option per field of ``cls``, then ``--config``,
    ``--print-config`` and ``extra``; :func:`build` turns ``given`` into the dataclass."""
    hints = typing.get_type_hints(cls)
    options = {f.name: option(f, hints[f.name]) for f in dataclasses.fields(cls)}
    options["config"] = (Path | None, _config_option(cls))
    options["print_config"] = (bool, PRINT_CONFIG)
    params = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)
        for name, (annotation, info) in options.items()
    ]

    def decorate(command: F) -> F:
        command.__signature__ = inspect.Signature([*params, *extra])  # type: ignore[attr-defined]
        return command

    return decorate


def build(cls: type[Any], given: dict[str, Any]) -> Any:
    """The dataclass of a command's options (``given``: what the command was called with)."""
    hints = typing.get_type_hints(cls)
    values = {f.name: given[f.name] for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if _is_list(hints[name]) and value is not None:
            values[name] = _int_list(value, "--" + name.replace("_", "-"))
    return cls(**values)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PloraError(f"{flag} must be comma-separated integers, got {text!r}") from None
