"""Reading plora's JSON files (plora.json, the shard manifest, a checkpoint's trainer state): an object
whose keys have the JSON types a schema expects, or a one-line error naming the file and the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parallel.errors import PloraError


class Count:
    """Shape marker: a JSON integer >= 0 (counts, sizes and ids are never negative)."""


# A key's expected JSON type: a Python type, Count, or a tuple of them (``type(None)`` for null).
Kind = type | tuple[type, ...]
Shape = dict[str, Kind]

_NAMES = {
    Count: "an integer",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "an object",
    list: "a list",
    type(None): "null",
}


def read_object(path: Path, error: type[PloraError] = PloraError) -> dict[str, Any]:
    """The JSON object in ``path``, or ``error`` in one line (unreadable, not JSON, not an object)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise error(f"{path}: cannot read it ({err.strerror or err})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, found {json_text(obj)}")
    return obj


def missing_keys(values: dict[str, Any], shape: Shape) -> list[str]:
    return [key for key in shape if key not in values]


def fields_problem(values: dict[str, Any], shape: Shape, prefix: str = "") -> str | None:
    """The first key of ``shape`` that ``values`` lacks or holds with another JSON type, said in
    words (``prefix`` names where ``values`` sits in its file), or None."""
    for key, kind in shape.items():
        if key not in values:
            return f"{prefix}{key} is missing"
        kinds = kind if isinstance(kind, tuple) else (kind,)
        value = values[key]
        if not any(_is(value, k) for k in kinds):
            expected = " or ".join(_NAMES[k] for k in kinds)
            return f"{prefix}{key} is {json_text(value)}, expected {expected}"
        if Count in kinds and isinstance(value, int) and value < 0:
            return f"{prefix}{key} is {value}, expected a count (>= 0)"
    return None


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # an int to Python, not to JSON
        return kind is bool
    if kind is Count:
        return isinstance(value, int)
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def json_text(value: Any) -> str:
    """A value as JSON, cut to 40 characters (for error messages)."""
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:37]}..."
