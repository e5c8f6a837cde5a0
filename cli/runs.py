"""`plora runs OUT_DIR`: the runs of a training output directory, their checkpoints and losses."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from cli.app import app
from pipeline.draw import check_png_target


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


@app.command("runs")
def runs_command(
    out_dir: Path = typer.Argument(..., help="The --out-dir of plora train."),
    png: Path | None = typer.Option(None, "--png", help="Also draw every run's loss curves into this PNG."),
) -> None:
    """A table of the runs in OUT_DIR: steps, losses (training and validation), times and checkpoints."""
    from trainer.runs import describe, find_runs, write_curves_png  # noqa: PLC0415 - slow import (torch)

    if png is not None:
        check_png_target(png)
    runs = find_runs(out_dir)
    for run in runs:
        facts = describe(run)
        total = f"/{facts['total_steps']}" if facts["total_steps"] else ""
        best = facts["best_val"]
        val = f", best validation loss {best[1]:.4f} at step {best[0]}" if best else ""
        typer.echo(
            f"run {run.name}: step {facts['steps']}{total}, logged loss {_loss(facts['first_loss'])} -> "
            f"{_loss(facts['last_loss'])}{val}, {_duration(facts['seconds'])} logged"
        )
        typer.echo(f"  {'checkpoint':<32}  {'step':>7}  {'loss':>8}  {'val loss':>8}  saved")
        for checkpoint in run.checkpoints:
            saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(checkpoint.saved))
            typer.echo(
                f"  {checkpoint.path.name:<32}  {checkpoint.step:>7}  {_loss(checkpoint.train_loss):>8}  "
                f"{_loss(checkpoint.val_loss):>8}  {saved}"
            )
        for bad in run.unreadable:
            typer.echo(f"  {bad.path.name:<32}  unreadable: {bad.reason}")
        if not run.checkpoints and not run.unreadable:
            typer.echo("  (no checkpoints)")
    if png is not None:
        typer.echo(f"loss curves written to {write_curves_png(runs, png)}")
