"""plora.json: what an adapter directory records beside PEFT's files so that inference rebuilds the
model it was trained with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from parallel.errors import PloraError

PLORA_JSON = "plora.json"


def read_plora_json(path: str | Path) -> dict[str, Any]:
    file = Path(path) / PLORA_JSON
    if not file.is_file():
        raise PloraError(f"{path}: no {PLORA_JSON}; not an adapter written by plora train")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PloraError(f"{file}: not valid JSON ({err})") from None
