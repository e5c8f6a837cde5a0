"""What a shard directory was built from: the tokenizer's identity and the run's fingerprint.

The tokenizer identity is a hash of what decides the token ids and the chat rendering, taken
from the loaded tokenizer's content rather than its files' bytes or serialisation, so that the
same tokenizer gives the same identity whichever `tokenizers` / `transformers` version loads it
(the trainer may run on another machine than `plora tokenize`). It covers the vocabulary
(added tokens included), the BPE merges, the ids a fixed probe text encodes to (which pins the
normaliser and pre-tokenizer's behaviour) with and without special tokens, the BOS/EOS/pad ids
and the chat template. Lists that differ between library versions without changing any id
(such as ``all_special_tokens``, or an unk token the vocabulary never produces) are left out.

The run fingerprint covers every input's bytes, the tokenizer identity, the plora version and
every option that changes the shards. Shards whose fingerprint matches are up to date.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

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


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _merges(tokenizer: Any) -> list[list[str]]:
    """The BPE merges as [left, right] pairs whichever way the tokenizer.json spells them."""
    model = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {})
    merges = model.get("merges") or []
    return [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """``{"name_or_path", "vocab_size", "sha256"}`` of a fast tokenizer (see the module docstring)."""
    vocab = tokenizer.get_vocab()
    # Not unk: some tokenizer classes default it even where the vocabulary never produces it.
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
    content = {
        "vocab": sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])),
        "merges": _merges(tokenizer),
        "probe": tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"],
        "probe_with_special": tokenizer("a", add_special_tokens=True)["input_ids"],
        "special": special,
        "chat_template": tokenizer.chat_template,  # str, a dict of named templates, or None
    }
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "vocab_size": len(tokenizer),
        "sha256": sha256_text(canonical_json(content)),
    }


def run_fingerprint(
    inputs: list[tuple[str, str]], tokenizer_sha256: str, options: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's ``fingerprint``: its parts and a digest over all of them."""
    parts = {
        "inputs": [list(p) for p in inputs],
        "tokenizer": tokenizer_sha256,
        "options": options,
        "plora": plora_version(),
    }
    return {**parts, "digest": sha256_text(canonical_json(parts))}
