"""`plora tiny-model`: build the tiny offline test model into a directory."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.app import app
from pipeline.tinymodel import ARCHS, build_tiny_model


@app.command("tiny-model")
def tiny_model(
    out: Path = typer.Option(..., "--out", help="Directory to create (absent or empty, or this model)."),
    arch: str = typer.Option("qwen2", "--arch", help=f"Model architecture: {' | '.join(ARCHS)}."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a non-empty --out (once the new model is whole)."
    ),
) -> None:
    """Build a tiny random-weight model, tokenizer trained on data/, offline: for tests and demos."""
    path = build_tiny_model(out, arch, overwrite=overwrite)
    typer.echo(f"tiny {arch} model ready at {path}")
