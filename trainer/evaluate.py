"""Mean loss per trained token, overall and per branch count, with the training positions and mask.

Shared by the training loop's validation and `plora eval` (base model, or base model + adapter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parallel.layout import DEFAULT_ROPE_2D_RATIO, DEFAULT_STRIDE
from pipeline.fingerprint import check_same_tokenizer
from trainer.checkpoint import read_plora_json
from trainer.config import TrainConfig
from trainer.data import RowStore, open_checked_shards
from trainer.distributed import pick_device
from trainer.model import TORCH_DTYPES, PackedLoss, add_lora, load_rope_model


@dataclass
class LossTotals:
    """Summed token cross-entropy and trained-token counts, overall and by branches per row."""

    loss_sum: float = 0.0
    tokens: int = 0
    rows: int = 0
    by_branches: dict[int, list[float]] = field(default_factory=dict)  # K -> [loss_sum, tokens, rows]

    @property
    def mean(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "loss": self.mean,
            "tokens": self.tokens,
            "rows": self.rows,
            "by_branches": {
                str(k): {"loss": s / n if n else float("nan"), "tokens": int(n), "rows": int(r)}
                for k, (s, n, r) in sorted(self.by_branches.items())
            },
        }


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype])


@torch.no_grad()
def evaluate_rows(
    loss_module: PackedLoss,
    store: RowStore,
    batches: Iterable[np.ndarray],
    *,
    device: torch.device,
    dtype: str,
    on_batch: Callable[[int], None] | None = None,
) -> LossTotals:
    """Token losses of the given row batches (the model is put in eval mode and restored)."""
    was_training = loss_module.training
    loss_module.eval()
    totals = LossTotals()
    try:
        for rows in batches:
            batch = store.collate(rows).to(device)
            with autocast(device, dtype):
                losses = loss_module.token_losses(
                    batch.input_ids, batch.branch_id, batch.time_id, batch.attention_mask, batch.labels
                )
            row_loss = losses.sum(dim=1).double().cpu().numpy()
            row_tokens = (batch.labels != -100).sum(dim=1).cpu().numpy()
            totals.loss_sum += float(row_loss.sum())
            totals.tokens += int(row_tokens.sum())
            totals.rows += len(rows)
            for k, loss, n in zip(batch.num_branches.tolist(), row_loss, row_tokens, strict=True):
                entry = totals.by_branches.setdefault(int(k), [0.0, 0, 0])
                entry[0] += float(loss)
                entry[1] += int(n)
                entry[2] += 1
            if on_batch is not None:
                on_batch(len(rows))
    finally:
        loss_module.train(was_training)
    return totals


@dataclass(frozen=True)
class EvalOptions:
    shards: str
    base_model: str
    adapter: str | None = None
    tokenizer_path: str | None = None
    batch_size: int = 16
    dtype: str | None = None  # None: the adapter's training dtype (its losses as trained), float32 without
    device: str = "auto"
    attn: str = "auto"
    # Used for a bare base model (an adapter brings its own from plora.json): the training defaults.
    patch_rope: bool = True
    rope_2d_ratio: float = DEFAULT_ROPE_2D_RATIO
    stride: int = DEFAULT_STRIDE
    mask: str = "isolated"
    trust_remote_code: bool = False


def run_eval(options: EvalOptions, on_batch: Callable[[int], None] | None = None) -> tuple[LossTotals, dict]:
    """Evaluate a base model or an adapter on every row of a shard directory.

    Returns the totals and a description of what was evaluated (model, positions, mask).
    """
    settings = {
        "patch_rope": options.patch_rope,
        "rope_2d_ratio": options.rope_2d_ratio,
        "pair_indices": None,
        "stride": options.stride,
        "mask": options.mask,
    }
    meta = read_plora_json(options.adapter) if options.adapter is not None else None
    if meta is not None:
        settings = {key: meta[key] for key in settings}
    dtype = options.dtype or (meta or {}).get("dtype", "float32")
    cfg = TrainConfig(
        shards=options.shards,
        base_model=options.base_model,
        tokenizer_path=options.tokenizer_path,
        trust_remote_code=options.trust_remote_code,
        attn=options.attn,
        batch_size=options.batch_size,
        dtype=dtype,
        device=options.device,
        **settings,
    ).validate()
    shards = open_checked_shards(cfg.shards, cfg.tokenizer_path or cfg.base_model, verify=True)
    if meta is not None:
        check_same_tokenizer(
            meta["tokenizer"],
            shards.manifest["tokenizer"],
            what=f"adapter {options.adapter}",
            against=f"the tokenizer of the shards in {options.shards}",
            fix="evaluate it on shards tokenized for its base model",
        )
    store = RowStore(shards)
    device = pick_device(options.device, 0)
    vocab_size = shards.manifest["tokenizer"]["vocab_size"]
    model, rope = load_rope_model(cfg, vocab_size, store.max_coordinates, device)
    if options.adapter is not None:
        model = add_lora(model, cfg, options.adapter).to(device)
    rows = np.arange(len(store))
    order = rows[np.argsort(-store.num_tokens, kind="stable")]  # similar lengths together: less padding
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    loss_module = PackedLoss(model, mask=cfg.mask, stride=rope.stride)
    totals = evaluate_rows(loss_module, store, batches, device=device, dtype=cfg.dtype, on_batch=on_batch)
    described = {
        "shards": str(Path(options.shards)),
        "base_model": options.base_model,
        "adapter": options.adapter,
        **settings,
        "stride": rope.stride,
        "pair_indices": list(rope.rope.pair_indices) if rope.rope is not None else [],
        "dtype": cfg.dtype,
    }
    return totals, described
