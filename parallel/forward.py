"""One packed forward for users, evaluation, training and tests: positions and mask built here.

We always hand the model our own 4D mask (a bool tensor or a FlexAttention BlockMask), or for
models with per-layer-type masks (Gemma2, sliding-window Qwen2/3) a dict of them. In
transformers >= 4.56, ``masking_utils._preprocess_mask_arguments`` returns a 4D mask as is
before looking at ``position_ids``, and those models take a dict as the finished per-layer
masks; so transformers' own mask builder, including its packed-sequence detection from
non-monotonic ``position_ids``, never runs. ``position_ids`` stay the ``[B, L]`` int64 tensor
transformers expects; they carry both RoPE coordinates (see parallel.rope2d).
"""

from __future__ import annotations

from typing import Any

import torch

from parallel.layout import IGNORE_INDEX
from parallel.masks import block_mask, dense_mask
from parallel.rope2d import encode_positions, model_stride
from pipeline.errors import PloraError

ATTN_CHOICES: tuple[str, ...] = ("auto", "flex", "sdpa", "eager")
_HF_NAMES = {"flex": "flex_attention", "flex_attention": "flex_attention", "sdpa": "sdpa", "eager": "eager"}


def resolve_attn(attn: str, device: torch.device | str) -> str:
    """The transformers ``attn_implementation`` for ``--attn``: auto = flex on CUDA, sdpa elsewhere.

    flash_attention_* cannot take an arbitrary mask, so it is refused rather than silently
    training with plain causal attention.
    """
    if attn == "auto":
        return "flex_attention" if torch.device(device).type == "cuda" else "sdpa"
    if attn not in _HF_NAMES:
        raise PloraError(
            f"unknown attention implementation {attn!r}; expected one of {', '.join(ATTN_CHOICES)}"
        )
    return _HF_NAMES[attn]


def _model_attn(model: torch.nn.Module, attn: str | None, device: torch.device) -> str:
    current = getattr(model.config, "_attn_implementation", None) or "eager"
    if attn is not None and resolve_attn(attn, device) != current:
        raise PloraError(
            f"model runs {current!r} attention, not {attn!r}; load it with that attn_implementation"
        )
    if current not in ("sdpa", "eager", "flex_attention"):
        raise PloraError(
            f"attention implementation {current!r} cannot take plora's mask; use sdpa, eager or flex"
        )
    return current


def build_attention_mask(
    model: torch.nn.Module,
    branch_id: torch.Tensor,
    time_id: torch.Tensor,
    mode: str,
    valid: torch.Tensor | None,
    attn: str | None = None,
    *,
    num_queries: int | None = None,
) -> Any:
    """What to pass as ``attention_mask``: one mask, or a per-layer-type dict (sliding-window layers).

    ``num_queries``: only the last tokens are queries (KV-cached decoding; see parallel.masks).
    """
    impl = _model_attn(model, attn, branch_id.device)
    config = model.config
    if impl == "flex_attention":

        def build(window: int | None) -> Any:
            return block_mask(branch_id, time_id, mode, valid, window=window, num_queries=num_queries)

    else:
        # eager adds the mask to the scores, so it needs the additive form in the model's dtype.
        dtype = model.get_input_embeddings().weight.dtype

        def build(window: int | None) -> Any:
            allowed = dense_mask(branch_id, time_id, mode, valid, window=window, num_queries=num_queries)
            if impl == "sdpa":
                return allowed
            zero = torch.zeros((), dtype=dtype, device=allowed.device)
            return torch.where(allowed, zero, torch.finfo(dtype).min)

    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise PloraError(
                f"layer types {sorted(unknown)} of {type(model).__name__} are not supported by plora"
            )
        if "sliding_attention" in layer_types:
            return {"full_attention": build(None), "sliding_attention": build(window)}
        return build(None)
    # No per-layer types (Llama, Mistral, Phi3): a configured window applies to every layer.
    return build(window)


def forward_packed(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    branch_id: torch.Tensor,
    time_id: torch.Tensor,
    *,
    mask: str = "isolated",
    stride: int | None = None,
    attention_mask: torch.Tensor | None = None,
    attn: str | None = None,
) -> torch.Tensor:
    """Logits ``[B, L, V]`` of packed rows.

    ``input_ids``, ``branch_id``, ``time_id`` are ``[B, L]`` as stored in the shards;
    ``attention_mask`` ``[B, L]`` (1 = real token, 0 = padding) marks padding. ``stride``
    defaults to the stride the model was patched with, and to 0 for an unpatched model: its
    plain RoPE would rotate by the whole encoded position (branch and time), so there the branch
    is left out and tokens are placed by ``time_id`` alone. ``attn`` only asserts the model's
    attention implementation; the mask kind follows ``model.config._attn_implementation``.
    No loss here: shard labels are already the next token (see :func:`packed_loss`).
    """
    if input_ids.ndim != 2 or input_ids.shape != branch_id.shape or input_ids.shape != time_id.shape:
        raise ValueError(
            "input_ids, branch_id and time_id must be [B, L] tensors of one shape, got "
            f"{tuple(input_ids.shape)}, {tuple(branch_id.shape)}, {tuple(time_id.shape)}"
        )
    device = input_ids.device
    branch_id = branch_id.to(device)
    time_id = time_id.to(device)
    valid = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
    if stride is None:
        stride = model_stride(model)
    # Padding may hold any coordinates; zero them so they stay in the encodable range.
    if valid is not None:
        branch_id = torch.where(valid, branch_id, 0)
        time_id = torch.where(valid, time_id, 0)
    position_ids = encode_positions(branch_id, time_id, stride)
    masks = build_attention_mask(model, branch_id, time_id, mask, valid, attn)
    out = model(input_ids=input_ids, attention_mask=masks, position_ids=position_ids, use_cache=False)
    return out.logits


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy ``[B, L]`` in fp32 (0 where the label is IGNORE_INDEX); no shift."""
    target = labels.to(device=logits.device, dtype=torch.long)
    flat = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return flat.reshape(target.shape)


def packed_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies in fp32, number of labelled tokens): shard labels are the next token."""
    return token_losses(logits, labels).sum(), (labels != IGNORE_INDEX).sum()
