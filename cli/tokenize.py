"""`plora tokenize`: tokenize and pack records into a verified shard directory."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.app import app
from parallel.layout import ALIGN_MODES, DEFAULT_BRANCHES, DEFAULT_MAX_SEQ_LEN, PackingOptions
from pipeline.convert import ConvertOptions, open_rejects
from pipeline.errors import PloraError
from pipeline.formats import FORMATS, MODES
from pipeline.readers import TXT_SPLITS
from pipeline.tokenize import DEFAULT_ROWS_PER_SHARD, TokenizeJob, tokenize_to_shards


@app.command("tokenize")
def tokenize_command(
    inputs: list[Path] = typer.Argument(
        None, metavar="INPUT...", help="Canonical records (JSONL/Parquet) or anything `plora convert` reads."
    ),
    tokenizer: Path = typer.Option(
        ..., "--tokenizer", help="Local HuggingFace model or tokenizer directory."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Shard directory to write."),
    branches: int = typer.Option(
        DEFAULT_BRANCHES, "--branches", "--branches_per_sample", help="Branches per row (fixed mode)."
    ),
    min_branches: int = typer.Option(1, "--min-branches", help="Dynamic mode: fewest branches per row."),
    max_branches: int = typer.Option(
        0,
        "--max-branches",
        "--max_branches_per_sample",
        help="Dynamic mode (when > 0): K per row drawn uniformly from [--min-branches, --max-branches].",
    ),
    max_seq_len: int = typer.Option(
        DEFAULT_MAX_SEQ_LEN, "--max-seq-len", "--max_seq_len", help="Longest branch; longer ones are split."
    ),
    align: str = typer.Option("left", "--align", help=f"Branch time alignment: {' | '.join(ALIGN_MODES)}."),
    seed: int = typer.Option(0, "--seed", help="Seed of the dynamic-mode branch counts."),
    no_train_trunk: bool = typer.Option(
        False, "--no-train-trunk", help="Do not train the trunk ('main') of parallel records."
    ),
    chat_template: Path | None = typer.Option(
        None, "--chat-template", help="Jinja chat template file replacing the tokenizer's own."
    ),
    num_proc: int = typer.Option(
        1, "--num-proc", help="Tokenizer processes (the shards do not depend on it)."
    ),
    rows_per_shard: int = typer.Option(
        DEFAULT_ROWS_PER_SHARD, "--rows-per-shard", help="Rows per shard file."
    ),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards built from something else."),
    fmt: str = typer.Option("auto", "--format", help=f"Record format: auto | {' | '.join(FORMATS)}."),
    mode: str = typer.Option("sft", "--mode", help=f"{' | '.join(MODES)} (pretrain turns chats into text)."),
    txt_split: str = typer.Option(
        "blank", "--txt-split", help=f"Plain .txt: one document per {' | '.join(TXT_SPLITS)} block."
    ),
    hf_dataset: str | None = typer.Option(
        None, "--hf-dataset", help="HuggingFace dataset: hub name, save_to_disk folder or data-file folder."
    ),
    hf_subset: str | None = typer.Option(None, "--hf-subset", help="Dataset configuration (subset) name."),
    hf_split: str = typer.Option("train", "--hf-split", help="Dataset split."),
    on_error: str = typer.Option(
        "raise", "--on-error", help="raise: stop at the first bad record | skip: reject it and go on."
    ),
    rejects: Path | None = typer.Option(
        None, "--rejects", help="Rejects file for --on-error skip. Default: <out>.rejects.jsonl beside --out."
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Live progress on stderr. Default: when stderr is a terminal."
    ),
) -> None:
    """Tokenize records with the model's tokenizer, pack them into rows, write shards + manifest."""
    try:
        packing = PackingOptions(
            branches=branches,
            min_branches=min_branches,
            max_branches=max_branches,
            max_seq_len=max_seq_len,
            align=align,  # type: ignore[arg-type] - validated by PackingOptions
            seed=seed,
            train_trunk=not no_train_trunk,
        )
    except ValueError as err:
        raise PloraError(f"bad packing options: {err}") from None
    job = TokenizeJob(
        inputs=tuple(inputs or ()),
        tokenizer=tokenizer,
        out=out,
        packing=packing,
        convert=ConvertOptions(
            fmt=fmt, mode=mode, txt_split=txt_split, hf_subset=hf_subset, hf_split=hf_split
        ),
        hf_dataset=hf_dataset,
        chat_template=chat_template,
        rows_per_shard=rows_per_shard,
        num_proc=num_proc,
        resume=resume,
        overwrite=overwrite,
    )
    sink = open_rejects(on_error, out, rejects)  # type: ignore[arg-type] - validated inside
    try:
        summary = tokenize_to_shards(job, sink, progress=progress)
    finally:
        sink.close()
    for line in summary.lines(sink.path):
        typer.echo(line, err=True)
