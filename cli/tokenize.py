"""`plora tokenize`: tokenize and pack records into a verified shard directory."""

from __future__ import annotations

from pathlib import Path

import typer

from cli import options
from cli.app import app
from parallel import outdir
from pipeline.convert import ConvertOptions, open_rejects
from pipeline.tokenize import DEFAULT_ROWS_PER_SHARD, TokenizeJob, tokenize_to_shards


@app.command("tokenize")
def tokenize_command(
    inputs: list[Path] = typer.Argument(
        None, metavar="INPUT...", help="Canonical records (JSONL/Parquet) or anything `plora convert` reads."
    ),
    tokenizer: str = typer.Option(
        ..., "--tokenizer", help="HuggingFace model or tokenizer: local directory or hub id (org/name)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Shard directory to write."),
    branches: int | None = options.BRANCHES,
    min_branches: int | None = options.MIN_BRANCHES,
    max_branches: int = options.MAX_BRANCHES,
    max_seq_len: int = options.MAX_SEQ_LEN,
    align: str = options.ALIGN,
    seed: int = options.SEED,
    no_train_trunk: bool = options.NO_TRAIN_TRUNK,
    chat_template: Path | None = options.CHAT_TEMPLATE,
    num_proc: int = typer.Option(
        1, "--num-proc", help="Tokenizer processes (the shards do not depend on it)."
    ),
    rows_per_shard: int = typer.Option(
        DEFAULT_ROWS_PER_SHARD, "--rows-per-shard", help="Rows per shard file."
    ),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards built from something else."),
    fmt: str = options.FORMAT,
    mode: str = options.MODE,
    txt_split: str = options.TXT_SPLIT,
    hf_dataset: str | None = options.HF_DATASET,
    hf_subset: str | None = options.HF_SUBSET,
    hf_split: str = options.HF_SPLIT,
    drop_empty_branches: bool = options.DROP_EMPTY_BRANCHES,
    on_error: str = options.ON_ERROR,
    rejects: Path | None = options.REJECTS,
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Live progress on stderr. Default: when stderr is a terminal."
    ),
) -> None:
    """Tokenize records with the model's tokenizer, pack them into rows, write shards + manifest."""
    packing = options.packing_options(
        branches=branches,
        min_branches=min_branches,
        max_branches=max_branches,
        max_seq_len=max_seq_len,
        align=align,
        seed=seed,
        no_train_trunk=no_train_trunk,
    )
    job = TokenizeJob(
        inputs=tuple(inputs or ()),
        tokenizer=tokenizer,
        out=out,
        packing=packing,
        convert=ConvertOptions(
            fmt=fmt,
            mode=mode,
            txt_split=txt_split,
            hf_subset=hf_subset,
            hf_split=hf_split,
            drop_empty_branches=drop_empty_branches,
        ),
        hf_dataset=hf_dataset,
        chat_template=chat_template,
        rows_per_shard=rows_per_shard,
        num_proc=num_proc,
        resume=resume,
        overwrite=overwrite,
    )
    inputs_of = [("the tokenizer", tokenizer), ("the chat template", chat_template)]
    outdir.refuse_protected(out, "--out", [*inputs_of, *(("the input", path) for path in job.inputs)])
    with outdir.lock(out, "--out"):  # two runs into one --out: the second stops at once
        sink = open_rejects(on_error, out, rejects)
        try:
            summary = tokenize_to_shards(job, sink, progress=progress)
        except OSError as err:  # disk full: name the shard directory, not a temporary file in it
            if not outdir.is_write_failure_in(out, err):
                raise
            raise outdir.write_failure(out, "the shards", err) from None
        finally:
            sink.close()
    for line in summary.lines(sink.path):
        typer.echo(line, err=True)
