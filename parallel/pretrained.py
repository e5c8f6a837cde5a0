"""Where a tokenizer or model comes from: a local directory or a HuggingFace hub id.

The original guide's users pass ``--base_model Qwen/Qwen2.5-0.5B-Instruct``, so every loader
(tokenizer, training base model, generation/export base model) accepts both, decided here once:

- a local path: anything that exists on disk, is absolute, or starts with ``./``, ``../`` or
  ``~``. It must be a directory; it is used as an absolute path (so plora.json records where it
  was) and read with ``local_files_only``.
- a hub id: ``name`` or ``org/name`` (the hub's own spelling rules) that is not a local path.
  transformers resolves it from the HuggingFace cache first, without the network; only when it is
  not cached, and ``HF_HUB_OFFLINE`` is not set, from the hub itself.
- a ``.gguf`` file: converted once into a cached local directory (:mod:`parallel.ggufmodel`).

Anything else is a one-line "no such directory". Remote code stays off unless the caller asks.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants

from parallel.errors import PloraError, first_line
from parallel.ggufmodel import ensure_gguf_model, is_gguf

# The hub's repo id rules: one or two parts of letters, digits, '-', '_', '.', no '--' or '..', at most 96.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_HUB_ID_MAX = 96
HUB_PROBE_SECONDS = 3.0


@dataclass(frozen=True)
class Pretrained:
    """A resolved ``from_pretrained`` source: an absolute local directory or a hub id."""

    name: str
    local: bool


def _is_hub_id(text: str) -> bool:
    return (
        _HUB_ID.fullmatch(text) is not None
        and len(text) <= _HUB_ID_MAX
        and "--" not in text
        and ".." not in text
        and not text.endswith(".")
    )


def resolve_pretrained(name: str | Path, *, what: str) -> Pretrained:
    """Decide whether ``name`` is a local directory, a hub id or a ``.gguf`` file (see the module
    docstring and :mod:`parallel.ggufmodel`).

    ``what`` names the thing in errors ("tokenizer", "base model").
    """
    text = str(name)
    path = Path(text).expanduser()
    if is_gguf(text):  # a GGUF file is converted once into an ordinary directory, and that is loaded
        return Pretrained(str(ensure_gguf_model(path)), local=True)
    path_like = path.is_absolute() or text.startswith(("./", "../", "~")) or text in (".", "..")
    if path.exists() or path_like or not _is_hub_id(text):
        if not path.is_dir():
            problem = "not a directory" if path.exists() else f"no such {what} directory"
            raise PloraError(
                f"{text}: {problem} (expected a local HuggingFace {what} directory or a hub id "
                "such as org/name)"
            )
        return Pretrained(os.path.abspath(path), local=True)
    return Pretrained(text, local=False)


def _hub_offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def _hub_endpoint() -> str:
    return str(constants.ENDPOINT)


@functools.lru_cache(maxsize=1)
def _hub_reachable(endpoint: str) -> bool:
    """Whether one TCP connection to the hub opens within seconds. Without a network the hub client
    retries every file for most of a minute before it gives up. Behind a proxy, only the client knows."""
    if urllib.request.getproxies():
        return True
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


def _check_hub_reachable(name: str, what: str) -> None:
    endpoint = _hub_endpoint()
    if not _hub_reachable(endpoint):
        raise PloraError(
            f"{name}: cannot load the {what}: not a local directory, not in the HuggingFace cache, and "
            f"the hub ({endpoint}) cannot be reached; give the path of a local {what} directory "
            "(starting with ./ or /), or download it where there is a network"
        )


def load_pretrained(loader: Any, name: str | Path, *, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(...)`` (AutoTokenizer, AutoModelForCausalLM) for a local directory or
    a hub id; whatever goes wrong is one line naming ``name`` and where it was looked for."""
    source = resolve_pretrained(name, what=what)
    # A hub id: the cache first, so that a cached model never touches the network.
    attempts = [True] if source.local or _hub_offline() else [True, False]
    for local_files_only in attempts:
        if not local_files_only:
            _check_hub_reachable(source.name, what)
        try:
            return loader.from_pretrained(source.name, local_files_only=local_files_only, **kwargs)
        except Exception as err:  # noqa: BLE001 - transformers raises many kinds; all mean "cannot load"
            error = err
    if source.local:
        where = "local directory"
    elif len(attempts) == 1:
        where = "HuggingFace cache only: HF_HUB_OFFLINE is set"
    else:
        where = "HuggingFace cache and hub"
    raise PloraError(f"{source.name}: cannot load the {what} ({where}): {first_line(error)}") from None
