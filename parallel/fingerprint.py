"""What a shard directory was built from: the tokenizer's identity and the run's fingerprint.

The tokenizer identity hashes the loaded tokenizer's content rather than its files' bytes or
serialisation, so that the same tokenizer gives the same identity whichever `tokenizers` /
`transformers` version loads it (the trainer may run on another machine than `plora tokenize`).
It has two digests:

- ``vocab_sha256``: what decides the ids a model reads: the vocabulary (added tokens included),
  the BPE merges, the ids a fixed probe text encodes to (which pins the normaliser and
  pre-tokenizer's behaviour) with and without special tokens, and the BOS/EOS/pad ids. Lists
  that differ between library versions without changing any id (such as
  ``all_special_tokens``, or an unk token the vocabulary never produces) are left out. Every
  reader of shards or adapters compares this one (:func:`check_same_tokenizer`): training and
  generation never render a chat, so the chat template does not matter to them.
- ``sha256``: ``vocab_sha256`` plus the chat template, which does decide how chats are
  tokenized; it is the tokenizer's part of the run fingerprint.

``version`` names the formula; identities of different versions cannot be compared, and a
reader says so instead of calling the tokenizer foreign.

The run fingerprint covers every input's bytes, the tokenizer identity, the plora version and
every option that changes the shards. Shards whose fingerprint matches are up to date.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from parallel.errors import PloraError
from parallel.layout import FORMAT_VERSION

# The identity formula; bump it whenever tokenizer_identity changes.
IDENTITY_VERSION = 2

# Fixed text whose encoding pins normaliser and pre-tokenizer behaviour: mixed case, accents, CJK,
# digits, punctuation runs, tabs, newlines and repeated spaces.
_PROBE_TEXT = (
    "Hello, World! It's 2024-05-17; naïve café ÅNGSTRÖM ﬁ ① ＡＢＣ 東京タワー 你好，世界。\n"
    "\tdef f(x):  return x**2  # ok?\r\n\n  trailing   spaces  …  ¿Qué? Ελληνικά русский 🙂\n"
)


def plora_version() -> str:
    try:
        return version("plora")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (inputs may be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _merges(tokenizer: Any) -> list[list[str]]:
    """The BPE merges as [left, right] pairs whichever way the tokenizer.json spells them."""
    model = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {})
    merges = model.get("merges") or []
    return [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """``{"version", "name_or_path", "vocab_size", "vocab_sha256", "sha256"}`` of a fast tokenizer
    (see the module docstring)."""
    vocab = tokenizer.get_vocab()
    # Not unk: some tokenizer classes default it even where the vocabulary never produces it.
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
    ids = {
        "vocab": sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])),
        "merges": _merges(tokenizer),
        "probe": tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"],
        "probe_with_special": tokenizer("a", add_special_tokens=True)["input_ids"],
        "special": special,
    }
    vocab_sha256 = sha256_text(canonical_json(ids))
    # The template is a str, a dict of named templates, or None.
    rendering = {"vocab_sha256": vocab_sha256, "chat_template": tokenizer.chat_template}
    return {
        "version": IDENTITY_VERSION,
        "name_or_path": str(tokenizer.name_or_path),
        "vocab_size": len(tokenizer),
        "vocab_sha256": vocab_sha256,
        "sha256": sha256_text(canonical_json(rendering)),
    }


class TokenizerMismatch(PloraError):
    """A tokenizer (or recorded identity) that does not give the ids something was built with."""


def check_same_tokenizer(
    recorded: Mapping[str, Any],
    tokenizer_or_identity: Any,
    *,
    what: str,
    against: str = "the tokenizer given",
    fix: str = "re-run plora tokenize with this tokenizer",
) -> None:
    """Raise :class:`TokenizerMismatch` unless the tokenizer gives the ids ``recorded`` was built with.

    ``recorded`` is an identity from a manifest or plora.json; ``tokenizer_or_identity`` a loaded
    tokenizer or another recorded identity. Compares ``vocab_sha256`` and ``vocab_size`` (not the
    chat template: readers never render chats). ``what`` names the recorded side (``"shards DIR"``),
    ``against`` the other; ``fix`` says what to do about a real mismatch.
    """
    have = (
        tokenizer_or_identity
        if isinstance(tokenizer_or_identity, Mapping)
        else tokenizer_identity(tokenizer_or_identity)
    )
    for side, identity in ((what, recorded), (against, have)):
        found = identity.get("version")
        if found != IDENTITY_VERSION:
            recorded_as = (
                "no tokenizer identity version" if found is None else f"tokenizer identity version {found}"
            )
            raise TokenizerMismatch(
                f"{side}: recorded with {recorded_as}, this plora computes version "
                f"{IDENTITY_VERSION}: re-run plora tokenize (and plora train, for an adapter)"
            )
    if have["vocab_sha256"] != recorded["vocab_sha256"] or have["vocab_size"] != recorded["vocab_size"]:
        raise TokenizerMismatch(
            f"{what}: recorded tokenizer {_describe(recorded)}, but {against} is {_describe(have)}; {fix}"
        )


def _describe(identity: Mapping[str, Any]) -> str:
    return (
        f"{identity.get('name_or_path', '?')} (vocab {identity['vocab_size']}, "
        f"vocab_sha256 {identity['vocab_sha256'][:12]})"
    )


def run_fingerprint(
    inputs: list[tuple[str, str]], tokenizer_sha256: str, options: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's ``fingerprint``: its parts and a digest over all of them."""
    parts = {
        "inputs": [list(p) for p in inputs],
        "tokenizer": tokenizer_sha256,
        "options": options,
        "plora": plora_version(),
        "format": FORMAT_VERSION,  # the layout: a journal of another one is never resumed
    }
    return {**parts, "digest": sha256_text(canonical_json(parts))}
