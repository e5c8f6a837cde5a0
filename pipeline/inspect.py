"""Facts about packed rows, for `plora inspect`: pure functions from rows and metadata to a dict.

The terminal tables, the ``--json`` document and the ``--png`` picture all show the same
facts dict, so what is drawn always agrees with what is printed. Visibility comes from
:func:`parallel.layout.visible` (the one definition), evaluated with numpy on the row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from parallel.layout import (
    FORMAT_VERSION,
    IGNORE_INDEX,
    MASK_MODES,
    META_COLUMNS,
    PackedRow,
    row_has_trunk,
    visible,
)
from pipeline.shards import Manifest

# Decodes token ids to text (a tokenizer's ``decode``); None shows ids instead.
Decode = Callable[[list[int]], str]

DEFAULT_BATCH_SIZE = 8
MASK_BLOCK_ELEMENTS = 1 << 22  # mask entries evaluated at once when counting visible pairs


# --------------------------------------------------------------------------------------
# Totals over all rows (from the shard metadata columns)
# --------------------------------------------------------------------------------------


def rows_metadata(rows: Iterable[PackedRow]) -> dict[str, np.ndarray]:
    """The metadata columns (``parallel.layout.META_COLUMNS``) of rows that are not in shards."""
    values: dict[str, list[int]] = {name: [] for name in META_COLUMNS}
    for row in rows:
        for name in META_COLUMNS:
            values[name].append(int(getattr(row, name)))
    return {name: np.asarray(v, dtype=np.int64) for name, v in values.items()}


def padding_waste(lengths: Sequence[int] | np.ndarray, batch_size: int) -> float:
    """Share of a padded batch's slots that hold padding, over batches of ``batch_size`` rows
    taken in the given order: ``sum(B_i * max_i - sum_i) / sum(B_i * max_i)``."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    lengths = np.asarray(lengths, dtype=np.int64)
    slots = 0
    used = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        slots += int(batch.size * batch.max())
        used += int(batch.sum())
    return (slots - used) / slots if slots else 0.0


def totals_facts(meta: Mapping[str, np.ndarray], batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, Any]:
    """Row, token and branch counts, and the padding a batch would waste, from metadata columns."""
    tokens = np.asarray(meta["num_tokens"], dtype=np.int64)
    trained = int(np.asarray(meta["num_trained"], dtype=np.int64).sum())
    total = int(tokens.sum())
    ks, counts = np.unique(np.asarray(meta["num_branches"], dtype=np.int64), return_counts=True)
    trunks = np.asarray(meta["trunk_len"], dtype=np.int64)
    return {
        "rows": int(tokens.size),
        "tokens": total,
        "trained_tokens": trained,
        "trained_fraction": trained / total if total else 0.0,
        "rows_with_trunk": int(np.count_nonzero(trunks > 0)),
        "branches_histogram": {str(int(k)): int(c) for k, c in zip(ks, counts, strict=True)},
        "tokens_per_row": {
            "min": int(tokens.min()) if tokens.size else 0,
            "mean": float(tokens.mean()) if tokens.size else 0.0,
            "max": int(tokens.max()) if tokens.size else 0,
        },
        "padding_waste": {
            "batch_size": batch_size,
            "stored_order": padding_waste(tokens, batch_size),
            "grouped_by_length": padding_waste(np.sort(tokens), batch_size),
        },
    }


def manifest_facts(manifest: Manifest) -> dict[str, Any]:
    """What a reader checks before trusting the shards, in short."""
    tokenizer = manifest.tokenizer
    return {
        "format_version": FORMAT_VERSION,
        "plora_version": manifest.plora_version,
        "tokenizer": {
            k: tokenizer[k] for k in ("name_or_path", "vocab_size", "version", "vocab_sha256", "sha256")
        },
        "chat_template": manifest.chat_template,
        "special_tokens": manifest.special_tokens,
        "packing": manifest.packing,
        "convert": manifest.convert,
        "fingerprint": manifest.digest,
        "files": [
            {"name": f.name, "rows": f.rows, "tokens": f.tokens, "bytes": f.bytes, "sha256": f.sha256}
            for f in manifest.files
        ],
        "num_rows": manifest.num_rows,
        "num_tokens": manifest.num_tokens,
        "num_trained": manifest.num_trained,
    }


# --------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowView:
    """A row sorted by (branch, time): the order pictures and tables read it in.

    ``target[i]`` says whether token i is a training target, i.e. the label of the previous
    token of its sequence is this token's id. ``has_trunk`` is what visibility uses
    (:func:`parallel.layout.row_has_trunk`): True for a lone sequence too, where it is harmless.
    """

    input_ids: np.ndarray
    branch_id: np.ndarray
    time_id: np.ndarray
    labels: np.ndarray
    target: np.ndarray
    has_trunk: bool

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def row_view(row: PackedRow) -> RowView:
    """The row sorted by (branch, time), with each token's target flag and the trunk test."""
    order = np.lexsort((row.time_id, row.branch_id))
    columns = (row.input_ids, row.branch_id, row.time_id, row.labels)
    ids, branch, time, labels = (np.asarray(column)[order] for column in columns)
    target = np.zeros(ids.shape, dtype=bool)
    same_sequence = branch[1:] == branch[:-1]
    target[1:] = same_sequence & (labels[:-1] != IGNORE_INDEX)
    valid = np.ones(ids.shape, dtype=bool)
    has_trunk = bool(row_has_trunk(branch, time, valid)) if ids.size else False
    return RowView(ids, branch, time, labels, target, has_trunk)


def visibility(
    view: RowView, mode: str, queries: np.ndarray | None = None, keys: np.ndarray | None = None
) -> np.ndarray:
    """Bool [Q, K] matrix: entry (i, j) says whether token ``keys[j]`` is visible to token
    ``queries[i]`` (indices into the sorted row; all tokens by default)."""
    everything = np.arange(view.num_tokens)
    q = everything if queries is None else np.asarray(queries)
    k = everything if keys is None else np.asarray(keys)
    b, t = view.branch_id.astype(np.int64), view.time_id.astype(np.int64)
    q_branch, q_time, k_branch, k_time = b[q][:, None], t[q][:, None], b[k][None, :], t[k][None, :]
    same_token = q[:, None] == k[None, :]
    return np.asarray(visible(mode, q_branch, q_time, k_branch, k_time, same_token, view.has_trunk))


def visible_pairs(view: RowView, mode: str) -> int:
    """How many (query, key) pairs the mode lets through, counted a block of queries at a time so
    that a row of many thousand tokens never holds its whole [L, L] mask."""
    n = view.num_tokens
    step = max(1, MASK_BLOCK_ELEMENTS // max(n, 1))
    return sum(
        int(np.count_nonzero(visibility(view, mode, queries=np.arange(start, min(start + step, n)))))
        for start in range(0, n, step)
    )


def mask_facts(pairs: int, n: int) -> dict[str, Any]:
    """How much a mask over n tokens lets through, and what a dense mask of the row costs to hold."""
    return {
        "visible_pairs": pairs,
        "density": pairs / (n * n) if n else 0.0,
        "causal_pairs": n * (n + 1) // 2,
        "dense_float32_bytes": 4 * n * n,
        "dense_bool_bytes": n * n,
    }


def sequence_facts(view: RowView, trunk_len: int, decode: Decode | None) -> list[dict[str, Any]]:
    """One entry per sequence (trunk, then branches), in branch_id order."""
    facts = []
    for b in np.unique(view.branch_id):
        at = view.branch_id == b
        ids = view.input_ids[at].tolist()
        times = view.time_id[at]
        facts.append(
            {
                "branch_id": int(b),
                "role": "trunk" if trunk_len > 0 and b == 0 else "branch",
                "tokens": len(ids),
                "time_start": int(times.min()),
                "time_end": int(times.max()),
                "trained_tokens": int(np.count_nonzero(view.labels[at] != IGNORE_INDEX)),
                "text": decode(ids) if decode is not None else None,
                "ids": ids,
            }
        )
    return facts


def row_facts(row: PackedRow, index: int, decode: Decode | None = None) -> dict[str, Any]:
    """Everything shown about one row."""
    view = row_view(row)
    return {
        "index": index,
        "tokens": row.num_tokens,
        "trained_tokens": row.num_trained,
        "num_branches": row.num_branches,
        "trunk_len": row.trunk_len,
        "has_trunk": row.trunk_len > 0,
        "time_span": int(view.time_id.max()) + 1 if view.num_tokens else 0,
        "sequences": sequence_facts(view, row.trunk_len, decode),
        "masks": {mode: mask_facts(visible_pairs(view, mode), view.num_tokens) for mode in MASK_MODES},
    }


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def token_texts(view: RowView, decode: Decode | None) -> list[str]:
    """Each token's own text (or its id without a decoder), for labelling grid cells."""
    if decode is None:
        return [str(i) for i in view.input_ids.tolist()]
    return [decode([i]) for i in view.input_ids.tolist()]
