"""plora's parallel layout (the contract, in parallel.layout) and the model side built on it.

Model-side names are imported lazily so that ``import parallel.layout`` stays torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "forward_packed": "parallel.forward",
    "packed_loss": "parallel.forward",
    "token_losses": "parallel.forward",
    "resolve_attn": "parallel.forward",
    "build_attention_mask": "parallel.forward",
    "dense_mask": "parallel.masks",
    "block_mask": "parallel.masks",
    "patch_model_2d_rope": "parallel.rope2d",
    "auto_pair_indices": "parallel.rope2d",
    "rope2d_config": "parallel.rope2d",
    "restore_2d_rope": "parallel.rope2d",
    "Rope2DConfig": "parallel.rope2d",
    "Rope2DError": "parallel.rope2d",
    "patch_model_with_interleaved_2d_rope": "parallel.columnar",
    "generate": "parallel.generation",
    "decode_parallel": "parallel.decoder",
    "load_parallel_model": "parallel.loading",
    "export_model": "parallel.loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'parallel' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
