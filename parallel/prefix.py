"""Shared-prefix attention for isolated rows (``--attn prefix``): no L x L mask is ever built.

In an isolated row (docs/layout.md "Attention") the trunk attends causally to itself and each
branch attends to the whole trunk plus its own earlier tokens; a branch never sees another. Dense
masked SDPA computes every branch against every other and masks (K - 1) / K of it away. Here each
layer runs two batched SDPA calls instead:

- the trunks of the batch, ``[B, T]`` right-padded, causal (padding sits after every real token,
  so no mask is needed);
- every branch of the batch stacked as a batch of its own, ``[N, Lb]``, against its row's trunk
  keys followed by its own keys. Without any trunk in the batch that is plain causal SDPA; with
  one, a small ``[N, 1, Lb, T + Lb]`` mask hides trunk padding (rows' trunks differ in length)
  and keeps the branch part causal.

Attention memory is O(N * Lb * (T + Lb)) rather than O(L^2). The row's segment structure is
computed once per forward (:func:`prefix_plan`) and reaches the model's layers the way plora's
dense mask does, as ``attention_mask``: a :class:`PrefixMask`, a 4D tensor that transformers
hands to the layers untouched and that carries the plan. A plain dense mask (KV-cached decoding,
where only the newest tokens are queries) runs as ordinary masked SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.functional import scaled_dot_product_attention

from parallel.errors import PloraError
from parallel.layout import row_has_trunk

# The name under which transformers' AttentionInterface knows this backend.
IMPLEMENTATION = "plora_prefix"


@dataclass(frozen=True)
class PrefixPlan:
    """Where each token of a ``[B, L]`` batch goes in the trunk and branch batches, and back.

    Indices are into the batch flattened to ``B * L`` tokens. Padding slots of the trunk and
    branch batches point at token 0 (any finite value does: no real query sees them).
    """

    trunk_index: torch.Tensor  # [B, T] long
    branch_index: torch.Tensor  # [N, Lb] long
    branch_row: torch.Tensor  # [N] long: the row whose trunk branch n sees
    branch_mask: torch.Tensor | None  # [N, 1, Lb, T + Lb] bool, None when T == 0
    # [B * L]: index of each token's output in cat(trunk outputs, branch outputs, one zero row);
    # padding takes the zero row.
    inverse: torch.Tensor


class PrefixMask(torch.Tensor):
    """A ``[B, 1, 0, 0]`` placeholder whose ``plan`` is the batch's :class:`PrefixPlan`.

    Four dimensions, so transformers' mask preprocessing returns it to the layers as is.
    """

    plan: PrefixPlan


def prefix_mask(
    branch_id: torch.Tensor,
    time_id: torch.Tensor,
    valid: torch.Tensor | None,
    row_id: torch.Tensor | None = None,
) -> PrefixMask:
    """What to pass as ``attention_mask`` to a model running :data:`IMPLEMENTATION`."""
    empty = torch.empty(branch_id.shape[0], 1, 0, 0, dtype=torch.bool, device=branch_id.device)
    carrier = empty.as_subclass(PrefixMask)
    carrier.plan = prefix_plan(branch_id, time_id, valid, row_id)
    return carrier


def _sequences(branch: np.ndarray, time: np.ndarray, real: np.ndarray) -> list[np.ndarray]:
    """The token indices of each sequence of one row, by branch id, each in time order."""
    where = np.nonzero(real)[0]
    order = where[np.lexsort((time[where], branch[where]))]
    sequences = np.split(order, np.nonzero(np.diff(branch[order]))[0] + 1) if order.size else []
    for seq in sequences:
        if np.any(np.diff(time[seq]) <= 0):
            raise ValueError(f"branch {int(branch[seq[0]])} repeats a time_id; each token has its own")
    return sequences


def prefix_plan(
    branch_id: torch.Tensor,
    time_id: torch.Tensor,
    valid: torch.Tensor | None,
    row_id: torch.Tensor | None = None,
) -> PrefixPlan:
    """The segment structure of isolated rows ``[B, L]`` (``valid`` False = padding).

    With ``row_id`` each ``[B, L]`` sequence holds several rows end to end (padding-free batches): every
    row gets its own trunk slot, and its branches see that trunk only.
    """
    batch, length = branch_id.shape
    branch = branch_id.cpu().numpy()
    time = time_id.cpu().numpy()
    real = np.ones_like(branch, dtype=bool) if valid is None else valid.cpu().numpy().astype(bool)
    rows_of = np.zeros_like(branch) if row_id is None else row_id.cpu().numpy()
    trunks: list[np.ndarray] = []
    branches: list[np.ndarray] = []
    rows: list[int] = []
    for b in range(batch):
        for r in np.unique(rows_of[b][real[b]]):
            mine = real[b] & (rows_of[b] == r)
            sequences = _sequences(branch[b], time[b], mine)
            # Sorted by branch id, a trunk is the first sequence (and its id is 0).
            trunk = bool(row_has_trunk(branch[b], time[b], mine)) and bool(sequences)
            trunk = trunk and branch[b, sequences[0][0]] == 0
            own = sequences[1:] if trunk else sequences
            branches.extend(seq + b * length for seq in own)
            rows.extend([len(trunks)] * len(own))
            trunks.append(sequences[0] + b * length if trunk else np.zeros(0, dtype=np.int64))
    trunk_index, trunk_real = _padded(trunks)
    branch_index, branch_real = _padded(branches)
    inverse = np.full(batch * length, trunk_index.size + branch_index.size, dtype=np.int64)
    inverse[trunk_index[trunk_real]] = np.nonzero(trunk_real.reshape(-1))[0]
    inverse[branch_index[branch_real]] = trunk_index.size + np.nonzero(branch_real.reshape(-1))[0]
    row = np.asarray(rows, dtype=np.int64)
    mask = None
    if trunk_index.shape[1]:
        mask = _branch_mask(trunk_real.sum(axis=1)[row], trunk_index.shape[1], branch_index.shape[1])

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(branch_id.device)

    return PrefixPlan(
        tensor(trunk_index),
        tensor(branch_index),
        tensor(row),
        None if mask is None else tensor(mask),
        tensor(inverse),
    )


def _padded(sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``[n, longest]`` indices right-padded with 0, and which entries are real."""
    longest = max((len(s) for s in sequences), default=0)
    index = np.zeros((len(sequences), longest), dtype=np.int64)
    real = np.zeros((len(sequences), longest), dtype=bool)
    for i, seq in enumerate(sequences):
        index[i, : len(seq)] = seq
        real[i, : len(seq)] = True
    return index, real


def _branch_mask(trunk_len: np.ndarray, width: int, branch_len: int) -> np.ndarray:
    """``[N, 1, Lb, T + Lb]``: branch n's queries see the first ``trunk_len[n]`` of the ``width``
    trunk keys and their own keys causally."""
    sees_trunk = np.arange(width)[None, None, :] < trunk_len[:, None, None]  # [N, 1, T]
    causal = np.tril(np.ones((branch_len, branch_len), dtype=bool))
    shape = (len(trunk_len), branch_len)
    mask = np.concatenate(
        [np.broadcast_to(sees_trunk, (*shape, width)), np.broadcast_to(causal, (*shape, branch_len))], axis=2
    )
    return np.ascontiguousarray(mask[:, None])


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, **kw: Any
) -> torch.Tensor:
    """SDPA, causal unless masked; GQA without copying the key/value heads."""
    gqa = q.shape[1] != k.shape[1]
    return scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa, **kw)


def prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query`` ``[B, H, L, D]``, ``key``/``value`` ``[B, Hkv, L, D]``
    -> (output ``[B, L, H, D]``, no weights)."""
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise PloraError("--attn prefix cannot apply attention softcapping or a sliding window; use sdpa")
    kw = {"dropout_p": dropout, "scale": scaling}
    if not isinstance(attention_mask, PrefixMask):
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
            raise PloraError("--attn prefix runs only on plora's packed inputs (parallel.forward)")
        return _sdpa(query, key, value, attention_mask, **kw).transpose(1, 2).contiguous(), None
    plan = attention_mask.plan
    batch, heads, length, dim = query.shape

    def flat(x: torch.Tensor) -> torch.Tensor:  # [B * L, heads, D]
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)

    q, k, v = flat(query), flat(key), flat(value)
    pieces = []
    trunk_k = trunk_v = None
    if plan.trunk_index.numel():
        trunk_k, trunk_v = k[plan.trunk_index].transpose(1, 2), v[plan.trunk_index].transpose(1, 2)
        pieces.append(_sdpa(q[plan.trunk_index].transpose(1, 2), trunk_k, trunk_v, None, **kw))
    if plan.branch_index.numel():
        own_k, own_v = k[plan.branch_index].transpose(1, 2), v[plan.branch_index].transpose(1, 2)
        if trunk_k is not None and trunk_v is not None:
            own_k = torch.cat([trunk_k[plan.branch_row], own_k], dim=2)
            own_v = torch.cat([trunk_v[plan.branch_row], own_v], dim=2)
        pieces.append(_sdpa(q[plan.branch_index].transpose(1, 2), own_k, own_v, plan.branch_mask, **kw))
    outputs = [p.transpose(1, 2).reshape(-1, heads, dim) for p in pieces]
    outputs.append(query.new_zeros(1, heads, dim))  # what padding gets
    return torch.cat(outputs)[plan.inverse].reshape(batch, length, heads, dim), None


def register_prefix() -> None:
    """Make :data:`IMPLEMENTATION` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface  # noqa: PLC0415 - slow import, only when used

    AttentionInterface.register(IMPLEMENTATION, prefix_attention)
