"""Every training option in one typed dataclass, with the original guide's defaults, checked up front.

The CLI (`plora train`), the guide-compatible script (trainer/train_hf_parallel_lora.py) and the tests all
build a :class:`TrainConfig`; :meth:`TrainConfig.validate` turns an impossible setting into a one-line
:class:`~parallel.errors.PloraError` before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from parallel.errors import PloraError
from parallel.hfmodel import DTYPES
from parallel.layout import DEFAULT_ROPE_2D_RATIO, DEFAULT_STRIDE, MASK_MODES

SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")
DEFAULT_LORA_NAME = "hf_parallel_lora"  # the original guide's file names: out/lora/hf_parallel_lora_final...


@dataclass
class TrainConfig:
    # Data and model.
    shards: str
    base_model: str
    tokenizer_path: str | None = None  # defaults to base_model, as in the guide
    trust_remote_code: bool = False
    attn: str = "auto"  # auto|flex|sdpa|eager (parallel.forward.resolve_attn checks it when loading)

    # LoRA. alpha defaults to the rank (scale 1), which is what the guide's own LoRA layer computed.
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # PEFT's "all-linear" = every Linear of the blocks, never lm_head
    load_lora: str | None = None
    lora_name: str = DEFAULT_LORA_NAME

    # 2D RoPE and attention (the layout contract).
    patch_rope: bool = True
    rope_2d_ratio: float = DEFAULT_ROPE_2D_RATIO
    pair_indices: list[int] | None = None  # 1-based; overrides rope_2d_ratio
    stride: int = DEFAULT_STRIDE
    mask: str = "isolated"

    # Optimisation.
    epochs: int = 1
    batch_size: int = 16  # rows per process per micro-step
    learning_rate: float = 1e-4
    accumulation_steps: int = 1
    grad_clip: float = 1.0  # 0 turns clipping off
    weight_decay: float = 0.0
    warmup: int = 0  # optimizer steps of linear warmup
    schedule: str = "cosine"  # decay after warmup, to min_lr_ratio * learning_rate
    min_lr_ratio: float = 0.1
    max_steps: int = 0  # > 0: the run's length in optimizer steps, overriding epochs (as in HF's Trainer)
    dtype: str = "bfloat16"
    seed: int = 42
    group_by_length: bool = False
    val_fraction: float = 0.0
    eval_interval: int = 0  # 0: validate at every save and at the end

    # Output.
    out_dir: str = "out"
    log_interval: int = 50
    save_interval: int = 500
    save_total_limit: int = 0  # keep the newest N step checkpoints (0: all); never the resumed one
    overwrite: bool = False  # a new run may replace an earlier run of this name in out_dir
    use_wandb: bool = False
    wandb_project: str = "plora"
    resume: str | None = None
    device: str = "auto"  # auto|cpu|cuda|cuda:N
    progress: bool = True
    save_every_minutes: float = 30.0  # also save when this long has passed since the last save (0: off)
    dist_timeout_minutes: float = 5.0  # under torchrun, from the second step: a collective's longest wait

    def validate(self) -> TrainConfig:
        """Raise PloraError naming the first impossible setting; return self for chaining."""
        checks: list[tuple[bool, str]] = [
            (
                0.0 <= self.rope_2d_ratio <= 1.0,
                f"--rope-2d-ratio must lie in [0, 1], got {self.rope_2d_ratio}",
            ),
            (
                self.stride >= 1 or not self.patch_rope,  # without 2D RoPE the branch never enters positions
                f"--stride must be a positive integer, got {self.stride}",
            ),
            (self.mask in MASK_MODES, f"--mask must be one of {', '.join(MASK_MODES)}, got {self.mask!r}"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
            (
                self.schedule in SCHEDULES,
                f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}",
            ),
            (self.lora_rank >= 1, f"--lora-rank must be at least 1, got {self.lora_rank}"),
            (
                self.lora_alpha is None or self.lora_alpha > 0,
                f"--lora-alpha must be positive, got {self.lora_alpha}",
            ),
            (0.0 <= self.lora_dropout < 1.0, f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}"),
            (bool(self.lora_targets.strip()), "--lora-targets must name at least one module"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (
                self.accumulation_steps >= 1,
                f"--accumulation-steps must be at least 1, got {self.accumulation_steps}",
            ),
            (
                math.isfinite(self.learning_rate) and self.learning_rate > 0,
                f"--learning-rate must be positive, got {self.learning_rate}",
            ),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 turns it off), got {self.grad_clip}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.warmup >= 0, f"--warmup must be >= 0 steps, got {self.warmup}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must lie in [0, 1], got {self.min_lr_ratio}"),
            (self.max_steps >= 0, f"--max-steps must be >= 0, got {self.max_steps}"),
            (0.0 <= self.val_fraction < 1.0, f"--val-fraction must lie in [0, 1), got {self.val_fraction}"),
            (self.eval_interval >= 0, f"--eval-interval must be >= 0, got {self.eval_interval}"),
            (self.log_interval >= 1, f"--log-interval must be at least 1, got {self.log_interval}"),
            (self.save_interval >= 1, f"--save-interval must be at least 1, got {self.save_interval}"),
            (
                self.save_total_limit >= 0,
                f"--save-total-limit must be >= 0 (0 keeps every checkpoint), got {self.save_total_limit}",
            ),
            (
                bool(self.lora_name) and "/" not in self.lora_name and not self.lora_name.startswith("."),
                f"--lora-name must be a plain file name, got {self.lora_name!r}",
            ),
            (
                self.save_every_minutes >= 0,
                f"--save-every-minutes must be >= 0 (0 turns it off), got {self.save_every_minutes}",
            ),
            (
                self.dist_timeout_minutes > 0,
                f"--dist-timeout-minutes must be positive, got {self.dist_timeout_minutes}",
            ),
        ]
        if self.pair_indices is not None:
            checks.append(
                (
                    all(i >= 1 for i in self.pair_indices),
                    f"--pair-indices must be 1-based pair numbers, got {self.pair_indices}",
                )
            )
        for ok, message in checks:
            if not ok:
                raise PloraError(message)
        return self

    @property
    def effective_alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def target_modules(self) -> str | list[str]:
        """PEFT's target_modules: the "all-linear" shorthand or a list of module names."""
        names = [name.strip() for name in self.lora_targets.split(",") if name.strip()]
        return "all-linear" if names == ["all-linear"] else names

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
