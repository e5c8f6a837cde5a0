"""Attention masks of packed rows, derived from ``(branch_id, time_id)`` via parallel.layout.

Two forms of the same visibility (``layout.visible`` + ``layout.row_has_trunk``):

- :func:`dense_mask`: a bool ``[B, 1, L, L]`` (True = may attend) for ``sdpa``/``eager``;
- :func:`block_mask`: a FlexAttention ``BlockMask`` for ``flex_attention``. Rows are stored
  branch-contiguous, so in isolated mode most 128x128 blocks are empty and skipped.

Padding (``valid`` False) neither sees nor is seen, except that a padding query sees itself:
an all-False row makes sdpa's softmax NaN, and a NaN in a padding token's output would reach
real tokens in the next layer through ``0 * NaN`` in the attention product.

``num_queries`` restricts the queries to the last ``num_queries`` tokens of the row (the keys are
still all of them), giving a ``[B, 1, num_queries, L]`` mask: KV-cached decoding feeds only the
newest tokens while the earlier ones sit in the cache. The full square mask is the case
``num_queries = L``.

``row_id`` (``[B, L]``, optional) lays several rows end to end in one sequence (padding-free batches,
trainer.data): a token sees only tokens of its own row, and each row's trunk is found within it.

``window`` adds a sliding window in time (``time(q) - time(k) < window``), for models whose
layers use sliding-window attention: in a packed row the time coordinate is what a 1D
sequence's position was, so this reproduces the model's own window on a single sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention.flex_attention import create_block_mask

from parallel.layout import MASK_MODES, row_has_trunk, visible


def _check(
    branch_id: torch.Tensor, time_id: torch.Tensor, mode: str, valid: torch.Tensor | None
) -> torch.Tensor:
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
    if branch_id.ndim != 2 or branch_id.shape != time_id.shape:
        raise ValueError(
            f"branch_id and time_id must be [B, L] tensors of one shape, got {tuple(branch_id.shape)} "
            f"and {tuple(time_id.shape)}"
        )
    if valid is None:
        return torch.ones_like(branch_id, dtype=torch.bool)
    if valid.shape != branch_id.shape:
        raise ValueError(f"attention_mask must be [B, L] like the tokens, got {tuple(valid.shape)}")
    return valid.to(device=branch_id.device, dtype=torch.bool)


def token_has_trunk(
    branch_id: torch.Tensor, time_id: torch.Tensor, valid: torch.Tensor, row_id: torch.Tensor | None
) -> torch.Tensor:
    """``[B, L]``: whether the row holding each token has a trunk (``layout.row_has_trunk`` per row)."""
    if row_id is None:
        return row_has_trunk(branch_id, time_id, valid)[:, None].expand_as(branch_id)
    batch, length = branch_id.shape
    rows = int(row_id.max()) + 1 if row_id.numel() else 1
    segment = (row_id + rows * torch.arange(batch, device=row_id.device)[:, None]).reshape(-1)
    big = torch.iinfo(torch.int32).max
    first = torch.where((branch_id == 0) & valid, time_id, -1).reshape(-1)
    others = torch.where(valid & (branch_id > 0), time_id, big).reshape(-1)
    first_end = torch.full((batch * rows,), -1, dtype=time_id.dtype, device=time_id.device)
    others_start = torch.full_like(first_end, big)
    first_end = first_end.scatter_reduce(0, segment, first, "amax")
    others_start = others_start.scatter_reduce(0, segment, others, "amin")
    return (first_end < others_start)[segment].reshape(batch, length)


def _query_offset(length: int, num_queries: int | None) -> int:
    """Index of the first query token: the queries are the last ``num_queries`` tokens."""
    if num_queries is None:
        return 0
    if not 0 < num_queries <= length:
        raise ValueError(f"num_queries must lie in 1..{length}, got {num_queries}")
    return length - num_queries


def _allowed(
    mode: str,
    qb: Any,
    qt: Any,
    kb: Any,
    kt: Any,
    same: Any,
    has_trunk: Any,
    vq: Any,
    vk: Any,
    window: int | None,
    same_row: Any,
) -> Any:
    """Visibility with padding, rows and the optional window; elementwise, shared by both mask forms.

    ``has_trunk`` is the key's row's: where it differs from the query's, ``same_row`` is False."""
    seen = visible(mode, qb, qt, kb, kt, same, has_trunk) & same_row
    if window is not None:
        seen = seen & (qt - kt < window)
    return (seen & vq & vk) | (same & ~vq)


def dense_mask(
    branch_id: torch.Tensor,
    time_id: torch.Tensor,
    mode: str = "isolated",
    valid: torch.Tensor | None = None,
    *,
    window: int | None = None,
    num_queries: int | None = None,
    row_id: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool ``[B, 1, Q, L]``: entry ``[b, 0, q, k]`` says whether query q of row b may attend to token k.

    The queries are the last ``Q = num_queries`` tokens (default: all ``L``, the square mask).
    """
    valid = _check(branch_id, time_id, mode, valid)
    has_trunk = token_has_trunk(branch_id, time_id, valid, row_id)
    length = branch_id.shape[1]
    first = _query_offset(length, num_queries)
    keys = torch.arange(length, device=branch_id.device)
    same = (keys[first:, None] == keys[None, :])[None]
    same_row = True if row_id is None else row_id[:, first:, None] == row_id[:, None, :]
    allowed = _allowed(
        mode,
        branch_id[:, first:, None],
        time_id[:, first:, None],
        branch_id[:, None, :],
        time_id[:, None, :],
        same,
        has_trunk[:, None, :],
        valid[:, first:, None],
        valid[:, None, :],
        window,
        same_row,
    )
    return allowed[:, None]


def mask_mod(
    branch_id: torch.Tensor,
    time_id: torch.Tensor,
    mode: str = "isolated",
    valid: torch.Tensor | None = None,
    *,
    window: int | None = None,
    num_queries: int | None = None,
    row_id: torch.Tensor | None = None,
) -> Any:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of the same visibility (queries: see dense_mask)."""
    valid = _check(branch_id, time_id, mode, valid)
    has_trunk = token_has_trunk(branch_id, time_id, valid, row_id)
    first = _query_offset(branch_id.shape[1], num_queries)

    def allowed(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q = q_idx + first
        return _allowed(
            mode,
            branch_id[b, q],
            time_id[b, q],
            branch_id[b, kv],
            time_id[b, kv],
            q == kv,
            has_trunk[b, kv],
            valid[b, q],
            valid[b, kv],
            window,
            True if row_id is None else row_id[b, q] == row_id[b, kv],
        )

    return allowed


def block_mask(
    branch_id: torch.Tensor,
    time_id: torch.Tensor,
    mode: str = "isolated",
    valid: torch.Tensor | None = None,
    *,
    window: int | None = None,
    num_queries: int | None = None,
    row_id: torch.Tensor | None = None,
) -> Any:
    """FlexAttention ``BlockMask`` of the rows (compiled construction on CUDA, eager elsewhere)."""
    batch, length = branch_id.shape
    return create_block_mask(
        mask_mod(branch_id, time_id, mode, valid, window=window, num_queries=num_queries, row_id=row_id),
        B=batch,
        H=None,
        Q_LEN=length if num_queries is None else num_queries,
        KV_LEN=length,
        device=branch_id.device,
        _compile=branch_id.is_cuda,
    )
