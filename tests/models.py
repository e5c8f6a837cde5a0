"""Tiny random-weight HuggingFace causal LMs of several architectures, for tests (no network).

Each config exercises something of its architecture that plora must keep intact: llama uses
YaRN rope scaling (attention_scaling != 1), phi3 partial rotary, mistral an every-layer
sliding window, gemma2 alternating sliding/full layers with logit softcapping (hence eager
attention), qwen3 q/k norms, cohere the interleaved rotary layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from parallel.layout import IGNORE_INDEX, PackedRow, SpecialTokens, TokenSequence, build_row

ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "cohere")
INTERLEAVED_ROTARY: frozenset[str] = frozenset({"cohere"})  # pair i at dims 2i, 2i+1 (others: i, i + n)
VOCAB = 128
WINDOW = 6  # small sliding window so that it matters in short test rows

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

_SPECIFIC: dict[str, dict[str, Any]] = {
    "llama": {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    },
    "qwen2": {},
    "qwen3": {},
    "mistral": {"sliding_window": WINDOW},
    "gemma2": {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
    "cohere": {},
    "phi3": {
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    },
}

# Gemma2's attention logit softcapping is not supported by sdpa.
DEFAULT_ATTN: dict[str, str] = {"gemma2": "eager"}


def tiny_config(arch: str) -> Any:
    if arch not in _SPECIFIC:
        raise ValueError(f"unknown test architecture {arch!r}; expected one of {ARCHS}")
    return AutoConfig.for_model(arch, **_COMMON, **_SPECIFIC[arch])


def tiny_model(arch: str, attn: str | None = None, seed: int = 0) -> PreTrainedModel:
    """fp32, eval mode, weights drawn from ``seed``; ``attn`` defaults to sdpa (eager for gemma2)."""
    torch.manual_seed(seed)
    impl = attn or DEFAULT_ATTN.get(arch, "sdpa")
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation=impl, dtype=torch.float32)
    return model.eval()


# --------------------------------------------------------------------------------------
# Packed rows, built by the contract's own packer (parallel.layout.build_row)
# --------------------------------------------------------------------------------------


def random_row(
    rng: np.random.Generator, trunk_len: int, branch_lens: list[int], align: str = "left"
) -> PackedRow:
    """A row with random token ids: a trunk of ``trunk_len`` (0 = none) and the given branches."""

    def seq(n: int) -> TokenSequence:
        return TokenSequence.of(rng.integers(3, VOCAB, size=n), True)

    trunk = seq(trunk_len) if trunk_len else None
    return build_row(trunk, [seq(n) for n in branch_lens], align, SpecialTokens(eos_id=2))


def collate(rows: list[PackedRow], perms: list[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """[B, L] tensors right-padded to the longest row, with ``attention_mask`` 1 = real token.

    ``perms`` optionally reorders each row's tokens (the contract says order carries no meaning).
    """
    length = max(r.num_tokens for r in rows)
    out = {
        name: torch.zeros(len(rows), length, dtype=torch.long)
        for name in ("input_ids", "branch_id", "time_id")
    }
    out["labels"] = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    out["attention_mask"] = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        order = perms[i] if perms is not None else np.arange(row.num_tokens)
        n = row.num_tokens
        for name in ("input_ids", "branch_id", "time_id", "labels"):
            out[name][i, :n] = torch.from_numpy(getattr(row, name)[order].astype(np.int64))
        out["attention_mask"][i, :n] = 1
    return out
