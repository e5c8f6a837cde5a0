"""`plora train` and `plora eval`. Options keep the original guide's underscore spellings as aliases.

Several processes: launch the same command under torchrun, e.g.
``torchrun --nproc_per_node 4 --no-python plora train --shards ... --base-model ...``.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import typer

from cli import fields
from cli.app import app
from parallel.adaptermeta import AdapterMeta
from parallel.errors import PloraError
from pipeline.progress import ProgressLine
from trainer.config import EvalOptions, TrainConfig
from trainer.configfile import render


def _check_attn(attn: str, device: str, mask: str) -> None:
    """--attn against the device and --mask, before the shards are verified and the model loads."""
    from parallel.forward import check_attn_device, check_attn_mask  # noqa: PLC0415 - torch only when needed
    from trainer.distributed import pick_device  # noqa: PLC0415

    check_attn_mask(attn, mask)
    check_attn_device(attn, pick_device(device, 0))  # every rank's device has the same type


def _check_adapter_agrees(
    adapter: str, rope_2d_ratio: float | None, stride: int | None, mask: str | None
) -> str:
    """An adapter is evaluated with the 2D RoPE and mask it was trained with (its plora.json); a flag
    that asks for another one is refused rather than ignored. Returns the adapter's mask."""
    recorded = AdapterMeta.read(adapter)
    for flag, value, was in (
        ("--rope-2d-ratio", rope_2d_ratio, recorded.rope_2d_ratio),
        ("--stride", stride, recorded.stride),
        ("--mask", mask, recorded.mask),
    ):
        if value is not None and value != was:
            raise PloraError(
                f"{flag} {value} disagrees with adapter {adapter}, trained with {was} "
                "(its plora.json); leave the flag out: the adapter decides"
            )
    return recorded.mask


# Not a TrainConfig field: torchrun's environment decides, so a config file has nothing to say about it.
DDP = inspect.Parameter(
    "ddp",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=bool,
    default=typer.Option(
        False, "--ddp", hidden=True, help="Accepted for the original guide; torchrun's environment decides."
    ),
)


@app.command("train")
@fields.from_fields(TrainConfig, DDP)
def train_command(**given: Any) -> None:
    """Train LoRA adapters with 2D RoPE and branch-aware attention on shards (DDP under torchrun)."""
    cfg: TrainConfig = fields.build(TrainConfig, given)
    if given["print_config"]:
        typer.echo(render(cfg.validate()), nl=False)
        return
    from trainer.loop import train  # noqa: PLC0415 - torch/transformers only when training

    _check_attn(cfg.attn, cfg.device, cfg.mask)
    train(cfg)


@app.command("eval")
@fields.from_fields(EvalOptions)
def eval_command(**given: Any) -> None:
    """Mean loss per trained token (and per branch count) of a base model or an adapter on shards."""
    options: EvalOptions = fields.build(EvalOptions, given)
    if given["print_config"]:
        typer.echo(render(options), nl=False)
        return
    from trainer.evaluate import run_eval  # noqa: PLC0415 - torch only when evaluating

    mask = options.mask or "isolated"
    if options.adapter is not None:
        mask = _check_adapter_agrees(options.adapter, options.rope_2d_ratio, options.stride, options.mask)
    _check_attn(options.attn, options.device, mask)
    # Drawn from the first batch on, so that an error in the checks before it stays one line.
    bar = ProgressLine("eval", enabled=options.progress, count=True)
    try:
        totals, described = run_eval(
            options, on_batch=bar.advance, on_start=lambda rows: bar.update(total=rows)
        )
    finally:
        bar.stop()
    facts = totals.to_json()
    if options.as_json:
        typer.echo(json.dumps({**facts, "model": described}, allow_nan=False))
        return
    who = f"adapter {options.adapter}" if options.adapter else f"base model {options.base_model}"
    every_row = options.split == "all" and not options.max_rows
    rows = "" if every_row else f", {options.split} split: {totals.rows} rows"
    typer.echo(
        f"{who} on {Path(options.shards)} (mask {described['mask']}, stride {described['stride']}, "
        f"{len(described['pair_indices'])} branch pairs{rows})"
    )
    typer.echo(f"{'branches':>8}  {'rows':>8}  {'tokens':>10}  {'loss':>8}")
    for k, entry in [*facts["by_branches"].items(), ("all", facts)]:
        loss = "-" if entry["loss"] is None else f"{entry['loss']:.4f}"  # no trained token: no loss
        typer.echo(f"{k:>8}  {entry['rows']:>8}  {entry['tokens']:>10}  {loss:>8}")
    sys.stdout.flush()
