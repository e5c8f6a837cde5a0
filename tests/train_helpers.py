"""Shared by the trainer tests: configs, command lines, adapter checks (shards: conftest.train_shards)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from trainer.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def quick_config(shards: Path, base_model: Path, out_dir: Path, **overrides: Any) -> TrainConfig:
    """A run of seconds: float32 (exact comparisons), small batches, no progress bar."""
    settings: dict[str, Any] = {
        "shards": str(shards),
        "base_model": str(base_model),
        "out_dir": str(out_dir),
        "batch_size": 4,
        "learning_rate": 3e-3,
        "dtype": "float32",
        "log_interval": 5,
        "save_interval": 1000,
        "progress": False,
        "device": "cpu",
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def cli_args(shards: Path, model_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """`plora train` arguments for the same quick run as :func:`quick_config` (float32, CPU, no bar)."""
    return [
        "train",
        "--shards", str(shards),
        "--base-model", str(model_dir),
        "--out-dir", str(out_dir),
        "--dtype", "float32",
        "--device", "cpu",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    """One thread per process (2 cores are shared), no hub, quiet tokenizers."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def adapter_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "adapter_model.safetensors"))


def max_adapter_difference(a: Path, b: Path) -> float:
    left, right = adapter_tensors(a), adapter_tensors(b)
    assert sorted(left) == sorted(right)
    return max(float((left[k] - right[k]).abs().max()) for k in left)


def relative_adapter_difference(a: Path, b: Path) -> float:
    """||a - b|| / ||b|| over all adapter weights together.

    Summing in another order (other processes, other batch split) changes gradients by float rounding;
    Adam turns rounding in a near-zero gradient into an lr-sized step for that one weight, so a few
    weights may differ by ~lr while the adapter as a whole agrees to about 1e-6.
    """
    left, right = adapter_tensors(a), adapter_tensors(b)
    assert sorted(left) == sorted(right)
    diff = sum(float((left[k] - right[k]).double().pow(2).sum()) for k in left) ** 0.5
    norm = sum(float(right[k].double().pow(2).sum()) for k in right) ** 0.5
    return diff / norm
