"""``--config FILE``: a run's options in YAML or TOML, checked key by key against the config dataclass.

Keys are the field names (``learning_rate``); every command-line spelling of the option without its
dashes is accepted too (``learning-rate``, ``lr``; ``json`` for ``--json``). An unknown key or a value
of the wrong type is a one-line error naming the file and the key. The effective config is written
back as YAML (:func:`render`), which :func:`read_config` reads again.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from parallel import atomic
from parallel.errors import PloraError
from trainer.config import TrainConfig, cli_flag, cli_opt
from trainer.metrics import logs_dir

CONFIG_FILE = "config.yaml"  # in the run's logs directory
SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML"}


def spellings(f: dataclasses.Field) -> list[str]:
    """The keys a config file may give ``f`` under: its name, then each command-line name undashed."""
    flags = [cli_flag(f), *cli_opt(f).aliases]
    names = [flag.split("/")[0].lstrip("-") for flag in flags]  # the "on" half of an on/off pair
    return list(dict.fromkeys([f.name, *names]))


def read_config(path: str | Path, cls: type) -> dict[str, Any]:
    """The field values a config file sets (by field name), each of its field's type."""
    raw = _load(Path(path))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    keys = {key: f.name for f in fields.values() for key in spellings(f)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in raw.items():
        name = keys.get(str(key))
        if name is None:
            close = difflib.get_close_matches(str(key), list(keys), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise PloraError(f"{path}: unknown key '{key}'{hint}")
        if name in given_as:
            raise PloraError(f"{path}: '{given_as[name]}' and '{key}' both set {name}; give one")
        given_as[name] = str(key)
        try:
            values[name] = conform(value, hints[name])
        except ValueError as err:
            raise PloraError(f"{path}: key '{key}' must be {err}, got {value!r}") from None
    return values


def _load(path: Path) -> dict[Any, Any]:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise PloraError(f"--config {path}: expected a .yaml, .yml or .toml file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PloraError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PloraError(f"--config {path}: cannot read it ({err})") from None
    if kind == "TOML":
        return _load_toml(path, text)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise PloraError(f"{path}: not valid YAML ({where}{getattr(err, 'problem', None) or err})") from None
    if raw is None:  # an empty YAML file
        return {}
    if not isinstance(raw, dict):
        raise PloraError(f"{path}: expected a mapping of option names to values, got {type(raw).__name__}")
    return raw


def _load_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        import tomllib  # noqa: PLC0415 - Python 3.11 and later
    except ModuleNotFoundError:
        raise PloraError(f"--config {path}: TOML needs Python 3.11 or later; write it as YAML") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise PloraError(f"{path}: not valid TOML ({err})") from None


def conform(value: Any, hint: Any) -> Any:
    """``value`` as a value of type ``hint``; ValueError says what was expected."""
    if isinstance(hint, types.UnionType):  # X | None
        if value is None:
            return None
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        try:
            if isinstance(value, list):
                return [conform(v, item) for v in value]
        except ValueError:
            pass
        raise ValueError(f"a list of {_expected(item, plural=True)}")
    if hint is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:  # text too: YAML 1.1 (PyYAML) reads 1e-4 as a string
            return float(value)
        except ValueError:
            raise ValueError(_expected(hint)) from None
    exact = {bool: bool, int: int, str: str}.get(hint)
    if exact is None or not isinstance(value, exact) or (hint is int and isinstance(value, bool)):
        raise ValueError(_expected(hint))
    return value


def _expected(hint: Any, plural: bool = False) -> str:
    if plural:
        return {bool: "true or false values", int: "integers", float: "numbers", str: "strings"}[hint]
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


# What one invocation asked for rather than what the run is: a saved config that kept them would
# replace the run (overwrite) or refuse to continue it (overwrite with resume) when run again.
INVOCATION_ONLY: tuple[str, ...] = ("overwrite", "resume")


def render(config: Any, *, leave_out: tuple[str, ...] = ()) -> str:
    """A config dataclass as the YAML that --config reads back (its fields in the dataclass's order)."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in leave_out}
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=False)


def save_run_config(cfg: TrainConfig) -> Path:
    """The run's config beside its metrics: how to run it again (``--config`` reads it), without the
    settings of this one invocation."""
    path = logs_dir(cfg.out_dir, cfg.lora_name) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, render(cfg, leave_out=INVOCATION_ONLY))
    return path
