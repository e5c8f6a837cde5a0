"""The original guide's module name: ``patch_model_with_interleaved_2d_rope(model, pair_indices)``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from parallel.layout import DEFAULT_STRIDE
from parallel.rope2d import Rope2DConfig, patch_model_2d_rope


def patch_model_with_interleaved_2d_rope(
    model: nn.Module, pair_indices: Sequence[int], stride: int = DEFAULT_STRIDE
) -> Rope2DConfig:
    """Give ``model`` 2D RoPE with the 1-based branch ``pair_indices`` (see ``auto_pair_indices``)."""
    return patch_model_2d_rope(model, stride=stride, pair_indices=pair_indices)
