"""Shared-prefix attention for isolated rows (``--attn prefix``): no L x L mask is ever built.

In an isolated row (docs/layout.md "Attention") the trunk attends causally to itself and each
branch attends to the whole trunk plus its own earlier tokens; a branch never sees another. Dense
masked SDPA computes every branch against every other and masks (K - 1) / K of it away. Here every
sequence of the batch (a trunk, or a branch) is its own short causal attention, a branch's keys led
by its row's trunk (its prefix). Sequences of similar length are stacked into groups, each one
batched SDPA call per layer:

- a group without prefixes (trunks, branches of rows without a trunk) is plain causal SDPA over its
  ``[n, Q]`` right-padded sequences (padding sits after every real token, so no mask is needed);
- a group with prefixes attends ``[n, Q]`` queries to ``[n, P + Q]`` keys, the prefix padded to the
  group's longest, under a small ``[n, 1, Q, P + Q]`` mask that hides prefix padding and keeps the
  own part causal.

Grouping by length (:func:`_grouping`) keeps the padding of a group small: one group for the whole
batch pads every branch to the longest one, which on Alpaca-like rows is most of the attention's
slots. Attention memory is O(sum of n * Q * (P + Q)) rather than O(L^2). The plan is computed once
per forward (:func:`prefix_plan`) and reaches the model's layers the way plora's dense mask does, as
``attention_mask``: a :class:`PrefixMask`, a 4D tensor that transformers hands to the layers
untouched and that carries the plan. A plain dense mask (KV-cached decoding, where only the newest
tokens are queries) runs as ordinary masked SDPA.
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

# What one more SDPA call per layer costs, in query-key slots, when grouping sequences by length.
# CPU: measured ~1 ms for a call's gathers, kernel and backward, as much as ~16k slots of a 4-head,
# 64-dim attention (bench.peers' model). Elsewhere kernel launches are dear next to slots: group
# only where it saves about a million slots per call (not measured).
GROUP_OVERHEAD_SLOTS = {"cpu": 2**14}
DEFAULT_GROUP_OVERHEAD_SLOTS = 2**20


@dataclass(frozen=True)
class PrefixGroup:
    """Sequences attended in one SDPA call; indices are into the batch flattened to ``B * L`` tokens,
    padding slots point at token 0 (any finite value does: no real query sees them)."""

    queries: torch.Tensor  # [n, Q] long: each sequence's own tokens in time order, right-padded
    keys: torch.Tensor  # [n, P + Q]: its prefix (row's trunk) padded to P, then ``queries``; P may be 0
    mask: torch.Tensor | None  # [n, 1, Q, P + Q] bool; None when P == 0 (plain causal)


@dataclass(frozen=True)
class PrefixPlan:
    """Where each token of a ``[B, L]`` batch goes in the groups' SDPA calls, and back."""

    groups: tuple[PrefixGroup, ...]
    # [B * L]: index of each token's output in cat(each group's outputs, one zero row); padding takes
    # the zero row.
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


def _row_sequences(
    branch_id: torch.Tensor, time_id: torch.Tensor, valid: torch.Tensor | None, row_id: torch.Tensor | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every sequence of the batch as (own tokens, prefix tokens), indices into the flattened batch:
    a trunk and a branch of a row without one have no prefix; a branch's prefix is its row's trunk."""
    batch, length = branch_id.shape
    branch = branch_id.cpu().numpy()
    time = time_id.cpu().numpy()
    real = np.ones_like(branch, dtype=bool) if valid is None else valid.cpu().numpy().astype(bool)
    rows_of = np.zeros_like(branch) if row_id is None else row_id.cpu().numpy()
    own: list[np.ndarray] = []
    prefixes: list[np.ndarray] = []
    none = np.zeros(0, dtype=np.int64)
    for b in range(batch):
        for r in np.unique(rows_of[b][real[b]]):
            mine = real[b] & (rows_of[b] == r)
            sequences = [seq + b * length for seq in _sequences(branch[b], time[b], mine)]
            # Sorted by branch id, a trunk is the first sequence (and its id is 0).
            trunk = bool(row_has_trunk(branch[b], time[b], mine)) and bool(sequences)
            trunk = trunk and branch[b, sequences[0][0] - b * length] == 0
            own.extend(sequences)
            prefixes.append(none)
            prefixes.extend([sequences[0] if trunk else none] * (len(sequences) - 1))
    return own, prefixes


def prefix_plan(
    branch_id: torch.Tensor,
    time_id: torch.Tensor,
    valid: torch.Tensor | None,
    row_id: torch.Tensor | None = None,
) -> PrefixPlan:
    """The segment structure of isolated rows ``[B, L]`` (``valid`` False = padding), grouped by length.

    With ``row_id`` each ``[B, L]`` sequence holds several rows end to end (padding-free batches): every
    row's branches see that row's trunk only.
    """
    own, prefixes = _row_sequences(branch_id, time_id, valid, row_id)
    overhead = GROUP_OVERHEAD_SLOTS.get(branch_id.device.type, DEFAULT_GROUP_OVERHEAD_SLOTS)
    own_len = np.array([len(s) for s in own], dtype=np.int64)
    prefix_len = np.array([len(s) for s in prefixes], dtype=np.int64)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(branch_id.device)

    inverse = np.full(branch_id.numel(), -1, dtype=np.int64)
    groups, offset = [], 0
    for members in _grouping(own_len, prefix_len, overhead):
        queries, real = _padded([own[i] for i in members])
        inverse[queries[real]] = offset + np.nonzero(real.reshape(-1))[0]
        offset += queries.size
        prefix, seen = _padded([prefixes[i] for i in members])
        query_index = tensor(queries)
        if not prefix.shape[1]:
            groups.append(PrefixGroup(query_index, query_index, None))
            continue
        keys = tensor(np.concatenate([prefix, queries], axis=1))
        groups.append(PrefixGroup(query_index, keys, tensor(_prefix_mask(seen, queries.shape[1]))))
    inverse[inverse < 0] = offset  # padding: the zero row after every group's outputs
    return PrefixPlan(tuple(groups), tensor(inverse))


def _grouping(own_len: np.ndarray, prefix_len: np.ndarray, overhead: int) -> list[np.ndarray]:
    """Sequences cut into groups, each padded to its longest own part and longest prefix, so that the
    slots computed (``n * Q * (P + Q)`` a group) plus ``overhead`` a group are fewest: an exact
    dynamic programme over the sequences sorted by length, each group a run of that order."""
    order = np.lexsort((prefix_len, own_len))
    own, prefix = own_len[order], prefix_len[order]
    best = np.zeros(len(order) + 1)
    start = np.zeros(len(order), dtype=np.int64)
    for j in range(len(order)):
        # The group of sequences i..j: its longest prefix and size, for every i at once.
        longest_prefix = np.maximum.accumulate(prefix[j::-1])[::-1]
        size = j + 1 - np.arange(j + 1)
        cost = best[: j + 1] + overhead + size * own[j] * (longest_prefix + own[j])
        start[j] = int(np.argmin(cost))
        best[j + 1] = cost[start[j]]
    groups = []
    end = len(order)
    while end:
        groups.append(order[start[end - 1] : end])
        end = int(start[end - 1])
    return groups[::-1]


def _padded(sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``[n, longest]`` indices right-padded with 0, and which entries are real."""
    longest = max((len(s) for s in sequences), default=0)
    index = np.zeros((len(sequences), longest), dtype=np.int64)
    real = np.zeros((len(sequences), longest), dtype=bool)
    for i, seq in enumerate(sequences):
        index[i, : len(seq)] = seq
        real[i, : len(seq)] = True
    return index, real


def _prefix_mask(seen: np.ndarray, length: int) -> np.ndarray:
    """``[n, 1, Q, P + Q]``: sequence i's queries see the real ones of its ``P`` prefix keys
    (``seen[i]``) and their own keys causally."""
    n, width = seen.shape
    causal = np.tril(np.ones((length, length), dtype=bool))
    mask = np.concatenate(
        [np.broadcast_to(seen[:, None, :], (n, length, width)), np.broadcast_to(causal, (n, length, length))],
        axis=2,
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
    outputs = []
    for group in plan.groups:
        own_k, own_v = k[group.keys].transpose(1, 2), v[group.keys].transpose(1, 2)
        out = _sdpa(q[group.queries].transpose(1, 2), own_k, own_v, group.mask, **kw)
        outputs.append(out.transpose(1, 2).reshape(-1, heads, dim))
    outputs.append(query.new_zeros(1, heads, dim))  # what padding gets
    return torch.cat(outputs)[plan.inverse].reshape(batch, length, heads, dim), None


def register_prefix() -> None:
    """Make :data:`IMPLEMENTATION` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface  # noqa: PLC0415 - slow import, only when used

    AttentionInterface.register(IMPLEMENTATION, prefix_attention)
