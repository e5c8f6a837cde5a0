"""`plora convert`: normalise SFT and plain-text data into canonical JSONL records."""

from __future__ import annotations

from pathlib import Path

import typer

from cli import options
from cli.app import app
from pipeline.convert import ConvertOptions, check_output_path, convert, open_rejects
from pipeline.grouping import DEFAULT_MAX_BRANCHES, parse_fields
from pipeline.lists import DEFAULT_MIN_ITEMS
from pipeline.readers import SUFFIX_KINDS


@app.command("convert")
def convert_command(
    inputs: list[Path] = typer.Argument(
        None, metavar="INPUT...", help=f"Data files: {', '.join(SUFFIX_KINDS)} (or .gz of a text one)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output JSONL, written atomically. Default: stdout (summary on stderr)."
    ),
    fmt: str = options.FORMAT,
    mode: str = options.MODE,
    txt_split: str = options.TXT_SPLIT,
    hf_dataset: str | None = options.HF_DATASET,
    hf_subset: str | None = options.HF_SUBSET,
    hf_split: str = options.HF_SPLIT,
    streaming: bool = typer.Option(False, "--streaming", help="Stream the dataset instead of caching it."),
    drop_empty_branches: bool = options.DROP_EMPTY_BRANCHES,
    split_lists: bool = typer.Option(
        False,
        "--split-lists",
        help="An assistant answer that is a numbered or bulleted list becomes a chat parallel record: "
        "the conversation and the answer's lead-in are the trunk, each item (marker kept) a branch.",
    ),
    min_items: int = typer.Option(
        DEFAULT_MIN_ITEMS, "--min-items", help="--split-lists: fewest items of a list that is split."
    ),
    group_by: str | None = typer.Option(
        None,
        "--group-by",
        metavar="FIELD[,FIELD]",
        help="Records sharing these fields become one chat parallel record: the fields are the trunk's "
        "user turn, each record's prompt and response a branch (polars, lazy scan).",
    ),
    max_branches: int = typer.Option(
        DEFAULT_MAX_BRANCHES,
        "--max-branches",
        help="--group-by: most branches per record; larger groups are split.",
    ),
    on_error: str = options.ON_ERROR,
    rejects: Path | None = options.REJECTS,
) -> None:
    """Convert Alpaca, ShareGPT, OpenAI messages, prompt/response, text and canonical records."""
    convert_options = ConvertOptions(
        fmt=fmt,
        mode=mode,
        txt_split=txt_split,
        hf_subset=hf_subset,
        hf_split=hf_split,
        streaming=streaming,
        drop_empty_branches=drop_empty_branches,
        split_lists=split_lists,
        min_items=min_items,
        group_by=parse_fields(group_by) if group_by is not None else (),
        max_branches=max_branches,
    )
    if out is not None:
        check_output_path(out)  # before the rejects file is created next to it
    sink = open_rejects(on_error, out, rejects)
    summary = convert(inputs or [], out, convert_options, sink, hf_dataset)
    for line in summary.lines(out, sink.path):
        typer.echo(line, err=True)
