"""`plora train` and `plora eval`. Options keep the original guide's underscore spellings as aliases.

Several processes: launch the same command under torchrun, e.g.
``torchrun --nproc_per_node 4 --no-python plora train --shards ... --base-model ...``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cli import options
from cli.app import app
from parallel.adaptermeta import read_plora_json
from parallel.errors import PloraError
from parallel.layout import DEFAULT_ROPE_2D_RATIO, DEFAULT_STRIDE
from trainer.config import DEFAULT_LORA_NAME, TrainConfig


def _pair_indices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PloraError(f"--pair-indices must be comma-separated integers, got {text!r}") from None


def _check_attn(attn: str, device: str) -> None:
    """--attn against the device, before the shards are verified and the model loads."""
    from parallel.forward import check_attn_device  # noqa: PLC0415 - torch only when needed
    from trainer.distributed import pick_device  # noqa: PLC0415

    check_attn_device(attn, pick_device(device, 0))  # every rank's device has the same type


def _check_adapter_agrees(adapter: str, **given: float | int | None) -> None:
    """An adapter is evaluated with the 2D RoPE it was trained with (its plora.json); a flag that
    asks for another one is refused rather than ignored."""

    recorded = read_plora_json(adapter)
    for name, value in given.items():
        if value is not None and value != recorded[name]:
            flag = "--" + name.replace("_", "-")
            raise PloraError(
                f"{flag} {value} disagrees with adapter {adapter}, trained with {recorded[name]} "
                "(its plora.json); leave the flag out: the adapter decides"
            )


@app.command("train")
def train_command(
    shards: Path = options.SHARDS,
    base_model: str = options.BASE_MODEL,
    tokenizer_path: str | None = options.TOKENIZER_PATH,
    trust_remote_code: bool = options.TRUST_REMOTE_CODE,
    attn: str = typer.Option(
        "auto", "--attn", help="auto | flex | sdpa | eager (auto: flex on CUDA, else sdpa)."
    ),
    lora_rank: int = typer.Option(8, "--lora-rank", "--lora_rank", help="LoRA rank."),
    lora_alpha: float | None = typer.Option(
        None, "--lora-alpha", help="LoRA alpha (default: the rank, scale 1)."
    ),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="Dropout on the LoRA input."),
    lora_targets: str = typer.Option(
        "all-linear", "--lora-targets", help="Comma-separated module names, or all-linear (never lm_head)."
    ),
    load_lora: str | None = typer.Option(
        None, "--load-lora", "--load_lora", help="Continue training this adapter directory."
    ),
    lora_name: str = typer.Option(
        DEFAULT_LORA_NAME,
        "--lora-name",
        "--lora_name",
        help="Adapter name: out/lora/NAME_stepN/ and NAME_final/.",
    ),
    patch_rope: bool = typer.Option(
        True, "--patch-rope/--no-patch-rope", "--patch_rope/--no_patch_rope", help="Apply 2D RoPE."
    ),
    rope_2d_ratio: float = typer.Option(
        DEFAULT_ROPE_2D_RATIO,
        "--rope-2d-ratio",
        "--rope_2d_ratio",
        help="Share of frequency pairs for branches.",
    ),
    pair_indices: str | None = typer.Option(
        None, "--pair-indices", help="1-based branch pairs, comma-separated (overrides --rope-2d-ratio)."
    ),
    stride: int = typer.Option(DEFAULT_STRIDE, "--stride", help="Branch position = branch_id * stride."),
    mask: str = typer.Option("isolated", "--mask", help="Attention: isolated | columnar."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the training rows."),
    batch_size: int = typer.Option(
        16, "--batch-size", "--batch_size", help="Rows per process per micro-step."
    ),
    learning_rate: float = typer.Option(1e-4, "--learning-rate", "--learning_rate", "--lr", help="Peak LR."),
    accumulation_steps: int = typer.Option(
        1, "--accumulation-steps", "--accumulation_steps", help="Micro-steps per optimizer step."
    ),
    grad_clip: float = typer.Option(1.0, "--grad-clip", "--grad_clip", help="Gradient norm clip (0: off)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    warmup: int = typer.Option(0, "--warmup", help="Optimizer steps of linear LR warmup."),
    schedule: str = typer.Option(
        "cosine", "--schedule", help="LR decay after warmup: cosine | linear | constant."
    ),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", help="Final LR as a share of the peak."),
    max_steps: int = typer.Option(
        0,
        "--max-steps",
        help="Length of the run in optimizer steps, overriding --epochs (more steps than --epochs makes go "
        "on into further epochs; 0: --epochs decides). The learning-rate schedule spans this total.",
    ),
    dtype: str = typer.Option("bfloat16", "--dtype", help="float32 | float16 | bfloat16 (autocast)."),
    seed: int = typer.Option(42, "--seed", help="Seed of LoRA init, data order and dropout."),
    group_by_length: bool = typer.Option(False, "--group-by-length", help="Batch rows of similar length."),
    val_fraction: float = typer.Option(0.0, "--val-fraction", help="Share of rows held out for validation."),
    eval_interval: int = typer.Option(0, "--eval-interval", help="Validate every N steps (0: at each save)."),
    out_dir: Path = typer.Option(Path("out"), "--out-dir", "--out_dir", help="Output directory."),
    log_interval: int = typer.Option(50, "--log-interval", "--log_interval", help="Log every N steps."),
    save_interval: int = typer.Option(
        500, "--save-interval", "--save_interval", help="Checkpoint every N steps."
    ),
    save_total_limit: int = typer.Option(
        0,
        "--save-total-limit",
        "--save_total_limit",
        help="Keep only the newest N step checkpoints (0: all); never the one resumed from, nor _final.",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Start a new run where an earlier one of this name is (its checkpoints and logs are removed).",
    ),
    use_wandb: bool = typer.Option(False, "--use-wandb", "--use_wandb", help="Also log to Weights & Biases."),
    wandb_project: str = typer.Option("plora", "--wandb-project", help="wandb project name."),
    resume: str | None = typer.Option(
        None,
        "--resume",
        help="Checkpoint directory to continue from exactly; 'latest': the newest in --out-dir, if any.",
    ),
    device: str = options.DEVICE,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    save_every_minutes: float = typer.Option(
        30.0,
        "--save-every-minutes",
        help="Also checkpoint when this many minutes passed since the last save (0: off).",
    ),
    dist_timeout_minutes: float = typer.Option(
        5.0,
        "--dist-timeout-minutes",
        help="Under torchrun, after the first step: a collective waiting longer fails the run (a hang).",
    ),
    ddp: bool = typer.Option(
        False, "--ddp", hidden=True, help="Accepted for the original guide; torchrun's environment decides."
    ),
) -> None:
    """Train LoRA adapters with 2D RoPE and branch-aware attention on shards (DDP under torchrun)."""
    from trainer.loop import train  # noqa: PLC0415 - torch/transformers only when training

    _check_attn(attn, device)
    cfg = TrainConfig(
        shards=str(shards),
        base_model=base_model,
        tokenizer_path=tokenizer_path,
        trust_remote_code=trust_remote_code,
        attn=attn,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        lora_targets=lora_targets,
        load_lora=load_lora,
        lora_name=lora_name,
        patch_rope=patch_rope,
        rope_2d_ratio=rope_2d_ratio,
        pair_indices=_pair_indices(pair_indices),
        stride=stride,
        mask=mask,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        accumulation_steps=accumulation_steps,
        grad_clip=grad_clip,
        weight_decay=weight_decay,
        warmup=warmup,
        schedule=schedule,
        min_lr_ratio=min_lr_ratio,
        max_steps=max_steps,
        dtype=dtype,
        seed=seed,
        group_by_length=group_by_length,
        val_fraction=val_fraction,
        eval_interval=eval_interval,
        out_dir=str(out_dir),
        log_interval=log_interval,
        save_interval=save_interval,
        save_total_limit=save_total_limit,
        overwrite=overwrite,
        use_wandb=use_wandb,
        wandb_project=wandb_project,
        resume=resume,
        device=device,
        progress=progress,
        save_every_minutes=save_every_minutes,
        dist_timeout_minutes=dist_timeout_minutes,
    )
    train(cfg)


@app.command("eval")
def eval_command(
    shards: Path = options.SHARDS,
    base_model: str = options.BASE_MODEL,
    adapter: str | None = typer.Option(
        None, "--adapter", help="Adapter directory from `plora train` (default: the base model alone)."
    ),
    tokenizer_path: str | None = options.TOKENIZER_PATH,
    batch_size: int = typer.Option(16, "--batch-size", "--batch_size", help="Rows per forward."),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="float32 | float16 | bfloat16 (default: the adapter's training dtype, else float32).",
    ),
    device: str = options.DEVICE,
    attn: str = typer.Option("auto", "--attn", help="auto | flex | sdpa | eager."),
    patch_rope: bool = typer.Option(
        True,
        "--patch-rope/--no-patch-rope",
        "--patch_rope/--no_patch_rope",
        help="Base model only: apply 2D RoPE (an adapter brings its settings in plora.json).",
    ),
    rope_2d_ratio: float | None = typer.Option(
        None,
        "--rope-2d-ratio",
        "--rope_2d_ratio",
        help=f"Base model only: share of frequency pairs for branches (default {DEFAULT_ROPE_2D_RATIO}); "
        "an adapter's plora.json decides, and a different value is refused.",
    ),
    stride: int | None = typer.Option(
        None,
        "--stride",
        help=f"Base model only: branch position = branch_id * stride (default {DEFAULT_STRIDE}); "
        "an adapter's plora.json decides, and a different value is refused.",
    ),
    mask: str = typer.Option("isolated", "--mask", help="Base model only: isolated | columnar."),
    trust_remote_code: bool = options.TRUST_REMOTE_CODE,
    split: str = typer.Option(
        "all",
        "--split",
        help="all | train | val: every row, or the rows the adapter's run trained on or held out "
        "(--val-fraction).",
    ),
    max_rows: int = typer.Option(0, "--max-rows", help="Only the first N rows of the split (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
) -> None:
    """Mean loss per trained token (and per branch count) of a base model or an adapter on shards."""
    from trainer.evaluate import EvalOptions, run_eval  # noqa: PLC0415 - torch only when evaluating

    _check_attn(attn, device)
    if adapter is not None:
        _check_adapter_agrees(adapter, rope_2d_ratio=rope_2d_ratio, stride=stride)
    eval_options = EvalOptions(
        shards=str(shards),
        base_model=base_model,
        adapter=adapter,
        tokenizer_path=tokenizer_path,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        attn=attn,
        patch_rope=patch_rope,
        rope_2d_ratio=DEFAULT_ROPE_2D_RATIO if rope_2d_ratio is None else rope_2d_ratio,
        stride=DEFAULT_STRIDE if stride is None else stride,
        mask=mask,
        trust_remote_code=trust_remote_code,
        split=split,
        max_rows=max_rows,
    )
    columns = (TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=Console(stderr=True), disable=not progress)
    task = bar.add_task("eval", total=None)

    def start(rows: int) -> None:
        bar.update(task, total=rows)

    def advance(rows: int) -> None:
        # Started on the first batch, so that an error in the checks before it stays one line.
        if not bar.live.is_started:
            bar.start()
        bar.advance(task, rows)

    try:
        totals, described = run_eval(eval_options, on_batch=advance, on_start=start)
    finally:
        if bar.live.is_started:  # stopping a bar that never started still prints a newline
            bar.stop()
    facts = totals.to_json()
    if as_json:
        typer.echo(json.dumps({**facts, "model": described}, allow_nan=False))
        return
    who = f"adapter {adapter}" if adapter else f"base model {base_model}"
    rows = "" if split == "all" and not max_rows else f", {split} split: {totals.rows} rows"
    typer.echo(
        f"{who} on {shards} (mask {described['mask']}, stride {described['stride']}, "
        f"{len(described['pair_indices'])} branch pairs{rows})"
    )
    typer.echo(f"{'branches':>8}  {'rows':>8}  {'tokens':>10}  {'loss':>8}")
    for k, entry in [*facts["by_branches"].items(), ("all", facts)]:
        loss = "-" if entry["loss"] is None else f"{entry['loss']:.4f}"  # no trained token: no loss
        typer.echo(f"{k:>8}  {entry['rows']:>8}  {entry['tokens']:>10}  {loss:>8}")
    sys.stdout.flush()
