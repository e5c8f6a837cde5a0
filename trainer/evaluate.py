"""Mean loss per trained token, overall and per branch count, with the training positions and mask.

Shared by the training loop's validation and `plora eval` (base model, or base model + adapter), which
evaluates every row, or the rows an adapter's run trained on or held out for validation (``--split``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parallel.adaptermeta import AdapterMeta
from parallel.errors import PloraError
from parallel.hfmodel import TORCH_DTYPES
from parallel.layout import DEFAULT_ROPE_2D_RATIO, DEFAULT_STRIDE
from parallel.loading import check_adapter_fits
from trainer.checkpoint import STATE_DIR, STATE_FILE, TrainerState
from trainer.config import SPLITS, EvalOptions, TrainConfig
from trainer.data import DataPlan, RowStore, open_checked_shards, split_rows, validation_batches
from trainer.distributed import pick_device
from trainer.fsdp import is_sharded
from trainer.model import PackedLoss, add_lora, load_rope_model


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
        """The totals as strict JSON: a loss over no trained token is null (NaN is not JSON)."""
        return {
            "loss": self.loss_sum / self.tokens if self.tokens else None,
            "tokens": self.tokens,
            "rows": self.rows,
            "by_branches": {
                str(k): {"loss": s / n if n else None, "tokens": int(n), "rows": int(r)}
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
            batch = store.collate(rows, padding_free=loss_module.padding_free).to(device)
            with autocast(device, dtype):
                losses = loss_module.token_losses(*batch.loss_inputs)
            row_loss = batch.per_row(losses.double()).cpu().numpy()
            row_tokens = batch.per_row((batch.labels != -100).long()).cpu().numpy()
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


def _run_state(adapter: str | None, split: str) -> TrainerState:
    """The trainer state of the run that wrote ``adapter``: its seed and --val-fraction fix the split."""
    if adapter is None:
        raise PloraError(f"--split {split} needs --adapter: the rows are those its training run split off")
    if not (Path(adapter) / STATE_DIR / STATE_FILE).is_file():
        raise PloraError(
            f"--split {split}: {adapter} has no {STATE_DIR}/{STATE_FILE}, so which rows its run held out "
            "is unknown; give a checkpoint of plora train"
        )
    return TrainerState.read(adapter)


def select_rows(options: EvalOptions, num_rows: int, shards_digest: str) -> np.ndarray:
    """The rows to evaluate: all, or the run's training or validation rows, then at most max_rows."""
    if options.split not in SPLITS:
        raise PloraError(f"--split must be one of {', '.join(SPLITS)}, got {options.split!r}")
    if options.max_rows < 0:
        raise PloraError(f"--max-rows must be >= 0 (0: all), got {options.max_rows}")
    rows = np.arange(num_rows)
    if options.split != "all":
        run = _run_state(options.adapter, options.split).identity
        if run.shards_digest != shards_digest:
            raise PloraError(
                f"--split {options.split}: {options.adapter} was trained on other shards than "
                f"{options.shards} (their digests differ); give the --shards it was trained on"
            )
        if options.split == "val" and run.val_fraction == 0:
            raise PloraError(f"--split val: the run of {options.adapter} held no rows out (--val-fraction 0)")
        train_rows, val_rows = split_rows(num_rows, val_fraction=run.val_fraction, seed=run.seed)
        rows = val_rows if options.split == "val" else train_rows
    return rows[: options.max_rows] if options.max_rows else rows


def _rope_settings(options: EvalOptions, adapter: AdapterMeta | None) -> dict[str, Any]:
    """Positions and mask: the adapter's own (its plora.json), else the options'."""
    if adapter is None:
        return {
            "patch_rope": options.patch_rope,
            "rope_2d_ratio": DEFAULT_ROPE_2D_RATIO
            if options.rope_2d_ratio is None
            else options.rope_2d_ratio,
            "pair_indices": None,
            "stride": DEFAULT_STRIDE if options.stride is None else options.stride,
            "mask": options.mask or "isolated",
        }
    return {
        "patch_rope": adapter.patch_rope,
        "rope_2d_ratio": adapter.rope_2d_ratio,
        "pair_indices": list(adapter.pair_indices),
        "stride": adapter.stride,
        "mask": adapter.mask,
    }


def run_eval(
    options: EvalOptions,
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> tuple[LossTotals, dict]:
    """Evaluate a base model or an adapter on the rows of a shard directory that ``options`` select;
    ``on_start`` learns how many rows that is before the model loads.

    Returns the totals and a description of what was evaluated (model, positions, mask, split).
    """
    adapter = AdapterMeta.read(options.adapter) if options.adapter is not None else None
    settings = _rope_settings(options, adapter)
    dtype = options.dtype or (adapter.dtype if adapter is not None else "float32")
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
    store = RowStore(shards)
    rows = select_rows(options, len(store), shards.manifest.digest)
    if on_start is not None:
        on_start(len(rows))
    device = pick_device(options.device, 0)
    vocab_size = shards.manifest.tokenizer["vocab_size"]
    model, rope = load_rope_model(cfg, vocab_size, store.max_coordinates, device)
    if adapter is not None:
        against = f"the tokenizer of the shards in {options.shards}"
        check_adapter_fits(adapter, model, shards.manifest.tokenizer, base=cfg.base_model, against=against)
        model = add_lora(model, cfg, options.adapter).to(device)
    order = rows[np.argsort(-store.num_tokens[rows], kind="stable")]  # similar lengths together: less padding
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
        "split": options.split,
        "max_rows": options.max_rows,
    }
    return totals, described


@torch.no_grad()
def join_validation(
    loss_module: PackedLoss, store: RowStore, plan: DataPlan, rank: int, device: torch.device, dtype: str
) -> None:
    """Under FSDP, after this rank's validation batches: weightless forwards until it has made as many
    as the rank with the most. Every forward all-gathers each layer with all ranks, so a rank with
    fewer validation batches (5 rows, 2 ranks, batch 2: 2 batches and 1) would leave the others waiting."""
    if not is_sharded(loss_module) or not len(plan.val_rows):
        return
    most = max(len(validation_batches(plan, r)) for r in range(plan.world_size))
    missing = most - len(validation_batches(plan, rank))
    if missing == 0:
        return
    batch = store.weightless(int(plan.val_rows[0])).to(device)
    was_training = loss_module.training
    loss_module.eval()
    for _ in range(missing):
        with autocast(device, dtype):
            loss_module.token_losses(
                batch.input_ids, batch.branch_id, batch.time_id, batch.attention_mask, batch.labels
            )
    loss_module.train(was_training)
