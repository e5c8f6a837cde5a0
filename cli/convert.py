"""`plora convert`: normalise SFT and plain-text data into canonical JSONL records."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.app import app
from pipeline.convert import ConvertOptions, convert, open_rejects
from pipeline.formats import FORMATS, MODES
from pipeline.readers import SUFFIX_KINDS, TXT_SPLITS

FORMAT_HELP = f"Record format: auto (detected per record) | {' | '.join(FORMATS)}."


@app.command("convert")
def convert_command(
    inputs: list[Path] = typer.Argument(
        None, metavar="INPUT...", help=f"Data files: {', '.join(SUFFIX_KINDS)} (or .gz of a text one)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output JSONL, written atomically. Default: stdout (summary on stderr)."
    ),
    fmt: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    mode: str = typer.Option(
        "sft", "--mode", help=f"{' | '.join(MODES)}: sft keeps chats as messages, pretrain makes them text."
    ),
    txt_split: str = typer.Option(
        "blank", "--txt-split", help=f"Plain .txt: one document per {' | '.join(TXT_SPLITS)} block."
    ),
    hf_dataset: str | None = typer.Option(
        None, "--hf-dataset", help="HuggingFace dataset: hub name, save_to_disk folder or data-file folder."
    ),
    hf_subset: str | None = typer.Option(None, "--hf-subset", help="Dataset configuration (subset) name."),
    hf_split: str = typer.Option("train", "--hf-split", help="Dataset split."),
    streaming: bool = typer.Option(False, "--streaming", help="Stream the dataset instead of caching it."),
    on_error: str = typer.Option(
        "raise", "--on-error", help="raise: stop at the first bad record | skip: reject it and go on."
    ),
    rejects: Path | None = typer.Option(
        None, "--rejects", help="Rejects file for --on-error skip. Default: <out>.rejects.jsonl beside --out."
    ),
) -> None:
    """Convert Alpaca, ShareGPT, OpenAI messages, prompt/response, text and canonical records."""
    options = ConvertOptions(
        fmt=fmt, mode=mode, txt_split=txt_split, hf_subset=hf_subset, hf_split=hf_split, streaming=streaming
    )
    sink = open_rejects(on_error, out, rejects)  # type: ignore[arg-type] - validated inside
    summary = convert(inputs or [], out, options, sink, hf_dataset)
    for line in summary.lines(out, sink.path):
        typer.echo(line, err=True)
