"""Every training and evaluation option in one typed dataclass each, with the original guide's defaults.

Each field carries its command-line definition (:class:`Opt`: help, the guide's spellings) as plain
data; cli/fields.py turns the fields into `plora train`'s and `plora eval`'s options and
trainer/configfile.py reads them from a ``--config`` file, so adding an option is adding a field.
The CLI, the guide-compatible script (trainer/train_hf_parallel_lora.py) and the tests all build a
:class:`TrainConfig`; :meth:`TrainConfig.validate` turns an impossible setting into a one-line
:class:`~parallel.errors.PloraError` before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from parallel.dtypes import DTYPES
from parallel.errors import PloraError
from parallel.layout import DEFAULT_ROPE_2D_RATIO, DEFAULT_STRIDE, MASK_MODES

SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")
SPLITS: tuple[str, ...] = ("all", "train", "val")
DEFAULT_LORA_NAME = "hf_parallel_lora"  # the original guide's file names: out/lora/hf_parallel_lora_final...


@dataclass(frozen=True)
class Opt:
    """How a config field is spelled on the command line (plain data: this layer knows no typer).

    The option is ``--`` and the field's name with dashes, unless ``flag`` names it; a bool that is on
    by default is an on/off pair (``--progress/--no-progress``), one that is off a bare switch.
    ``aliases`` are further spellings, above all the original guide's (``--lora_rank``); a config file
    accepts every spelling, without its dashes, as a key."""

    help: str
    aliases: tuple[str, ...] = ()
    flag: str = ""
    panel: str | None = None  # a help table of its own


def opt(
    help: str,
    default: Any = dataclasses.MISSING,
    *,
    aliases: tuple[str, ...] = (),
    flag: str = "",
    panel: str | None = None,
) -> Any:
    """A field whose command-line definition rides in its metadata; no default: a required option."""
    return field(default=default, metadata={"cli": Opt(help, aliases, flag, panel)})


def same_as(name: str) -> Any:
    """An :class:`EvalOptions` field that is the same option as TrainConfig's ``name``: one definition."""
    shared = TrainConfig.__dataclass_fields__[name]
    return field(default=shared.default, metadata=shared.metadata)


def cli_opt(f: dataclasses.Field) -> Opt:
    return f.metadata["cli"]


def cli_flag(f: dataclasses.Field) -> str:
    """The field's own command-line flag (``--learning-rate``, or the one :class:`Opt` names)."""
    return cli_opt(f).flag or "--" + f.name.replace("_", "-")


@dataclass
class TrainConfig:
    # Data and model.
    shards: str = opt("Shard directory written by `plora tokenize`.")
    base_model: str = opt(
        "HuggingFace causal LM: local directory or hub id (org/name).", aliases=("--base_model",)
    )
    tokenizer_path: str | None = opt(
        "Tokenizer directory or hub id (default: --base-model).", None, aliases=("--tokenizer_path",)
    )
    trust_remote_code: bool = opt("Run the model repo's own code.", False)
    # parallel.forward.resolve_attn checks it when the model loads
    attn: str = opt(
        "auto | flex | sdpa | eager | prefix (auto: flex on CUDA; on the CPU prefix for isolated rows where "
        "the model allows it, else sdpa; prefix: shared-prefix attention, isolated rows only; prefix and "
        "flex batches are padding-free).",
        "auto",
    )

    # LoRA. alpha defaults to the rank (scale 1), which is what the guide's own LoRA layer computed.
    lora_rank: int = opt("LoRA rank.", 8, aliases=("--lora_rank",))
    lora_alpha: float | None = opt("LoRA alpha (default: the rank, scale 1).", None)
    lora_dropout: float = opt("Dropout on the LoRA input.", 0.0)
    # PEFT's "all-linear": every Linear of the blocks
    lora_targets: str = opt("Comma-separated module names, or all-linear (never lm_head).", "all-linear")
    load_lora: str | None = opt("Continue training this adapter directory.", None, aliases=("--load_lora",))
    lora_name: str = opt(
        "Adapter name: out/lora/NAME_stepN/ and NAME_final/.", DEFAULT_LORA_NAME, aliases=("--lora_name",)
    )

    # 2D RoPE and attention (the layout contract).
    patch_rope: bool = opt("Apply 2D RoPE.", True, aliases=("--patch_rope/--no_patch_rope",))
    rope_2d_ratio: float = opt(
        "Share of frequency pairs for branches.", DEFAULT_ROPE_2D_RATIO, aliases=("--rope_2d_ratio",)
    )
    pair_indices: list[int] | None = opt(
        "1-based branch pairs, comma-separated (overrides --rope-2d-ratio).", None
    )
    stride: int = opt("Branch position = branch_id * stride.", DEFAULT_STRIDE)
    mask: str = opt("Attention: isolated | columnar.", "isolated")

    # Optimisation.
    epochs: int = opt("Passes over the training rows.", 1)
    batch_size: int = opt("Rows per process per micro-step.", 16, aliases=("--batch_size",))
    learning_rate: float = opt("Peak LR.", 1e-4, aliases=("--learning_rate", "--lr"))
    accumulation_steps: int = opt("Micro-steps per optimizer step.", 1, aliases=("--accumulation_steps",))
    grad_clip: float = opt("Gradient norm clip (0: off).", 1.0, aliases=("--grad_clip",))
    weight_decay: float = opt("AdamW weight decay.", 0.0)
    warmup: int = opt("Optimizer steps of linear LR warmup.", 0)
    schedule: str = opt("LR decay after warmup: cosine | linear | constant.", "cosine")
    min_lr_ratio: float = opt("Final LR as a share of the peak.", 0.1)
    max_steps: int = opt(
        "Length of the run in optimizer steps, overriding --epochs (more steps than --epochs makes go "
        "on into further epochs; 0: --epochs decides). The learning-rate schedule spans this total.",
        0,
    )
    dtype: str = opt("float32 | float16 | bfloat16 (autocast).", "bfloat16")
    seed: int = opt("Seed of LoRA init, data order and dropout.", 42)
    group_by_length: bool = opt("Batch rows of similar length.", False)
    val_fraction: float = opt("Share of rows held out for validation.", 0.0)
    eval_interval: int = opt("Validate every N steps (0: at each save).", 0)

    # Output.
    out_dir: str = opt("Output directory.", "out", aliases=("--out_dir",))
    log_interval: int = opt("Log every N steps.", 50, aliases=("--log_interval",))
    save_interval: int = opt("Checkpoint every N steps.", 500, aliases=("--save_interval",))
    save_total_limit: int = opt(
        "Keep only the newest N step checkpoints (0: all); never the one resumed from, nor _final.",
        0,
        aliases=("--save_total_limit",),
    )
    overwrite: bool = opt(
        "Start a new run where an earlier one of this name is (its checkpoints and logs are removed).", False
    )
    use_wandb: bool = opt("Also log to Weights & Biases.", False, aliases=("--use_wandb",))
    wandb_project: str = opt("wandb project name.", "plora")
    resume: str | None = opt(
        "Checkpoint directory to continue from exactly; 'latest': the newest in --out-dir, if any.", None
    )
    device: str = opt("auto | cpu | cuda | cuda:N.", "auto")
    progress: bool = opt("Show the progress bar.", True)
    gradient_checkpointing: bool = opt(
        "Recompute each decoder layer in backward: far less activation memory, about 1/3 more compute.",
        False,
        panel="Memory",  # its own table: the name is too long for the options table at 80 columns
    )
    save_every_minutes: float = opt(
        "Also checkpoint when this many minutes passed since the last save (0: off).", 30.0, panel="Long runs"
    )
    dist_timeout_minutes: float = opt(
        "Under torchrun, after the first step: a collective waiting longer fails the run (a hang); "
        "longer than a checkpoint takes to write.",
        5.0,
        panel="Long runs",
    )

    fsdp: bool = opt(
        "Under torchrun: shard the model over the processes with FSDP2 instead of DDP (bases too large "
        "for one device).",
        False,
        panel="Memory",
    )

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
            (
                not (self.fsdp and self.dtype == "float16"),
                "--fsdp with --dtype float16: the loss scaler would see only this process's shard of the "
                "gradients; use --dtype bfloat16 or float32",
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


@dataclass(frozen=True)
class EvalOptions:
    """What `plora eval` evaluates and how; the options it shares with training are TrainConfig's own."""

    shards: str = same_as("shards")
    base_model: str = same_as("base_model")
    adapter: str | None = opt("Adapter directory from `plora train` (default: the base model alone).", None)
    tokenizer_path: str | None = same_as("tokenizer_path")
    batch_size: int = opt("Rows per forward.", 16, aliases=("--batch_size",))
    # None: the adapter's training dtype (its losses as trained), float32 without
    dtype: str | None = opt(
        "float32 | float16 | bfloat16 (default: the adapter's training dtype, else float32).", None
    )
    device: str = same_as("device")
    attn: str = same_as("attn")
    # Used for a bare base model (an adapter brings its own from plora.json): the training defaults.
    patch_rope: bool = opt(
        "Base model only: apply 2D RoPE (an adapter brings its settings in plora.json).",
        True,
        aliases=("--patch_rope/--no_patch_rope",),
    )
    rope_2d_ratio: float | None = opt(
        f"Base model only: share of frequency pairs for branches (default {DEFAULT_ROPE_2D_RATIO}); "
        "an adapter's plora.json decides, and a different value is refused.",
        None,
        aliases=("--rope_2d_ratio",),
    )
    stride: int | None = opt(
        f"Base model only: branch position = branch_id * stride (default {DEFAULT_STRIDE}); "
        "an adapter's plora.json decides, and a different value is refused.",
        None,
    )
    mask: str | None = opt(
        "Base model only: isolated | columnar (default isolated); an adapter's plora.json decides, and a "
        "different value is refused.",
        None,
    )
    trust_remote_code: bool = same_as("trust_remote_code")
    split: str = opt(
        f"{' | '.join(SPLITS)}: every row, or the rows the adapter's run trained on or held out "
        "(--val-fraction).",
        "all",
    )
    max_rows: int = opt("Only the first N rows of the split (0: all).", 0)
    as_json: bool = opt("Print one JSON object instead of a table.", False, flag="--json")
    progress: bool = same_as("progress")
