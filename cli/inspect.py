"""`plora inspect PATH`: what a shard directory holds (or how a records file would be packed).

Totals over all rows, one row's sequences as a table, its masks in both modes, and with
``--png`` a picture of them; ``--json`` prints the same facts as one JSON document.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table
from rich.text import Text

from cli import options
from cli.app import app
from parallel.errors import PloraError, Rejects
from parallel.layout import PackedRow, PackingOptions
from parallel.tokenizer import load_tokenizer
from pipeline.convert import ConvertOptions, iter_records
from pipeline.draw import check_png_target, write_row_png
from pipeline.inspect import (
    DEFAULT_BATCH_SIZE,
    Decode,
    human_bytes,
    manifest_facts,
    row_facts,
    row_view,
    rows_metadata,
    token_texts,
    totals_facts,
)
from pipeline.shards import Manifest, ShardError, open_shards
from pipeline.tokenize import pack_records

# Terminal only; --json carries everything in full.
TEXT_PREVIEW_CHARS = 240
MAX_FILES_LISTED = 4


@app.command("inspect")
def inspect_command(
    path: Path = typer.Argument(..., help="A shard directory, or a records file (packed, nothing written)."),
    row: int = typer.Option(0, "--row", help="Which row to show (0-based)."),
    png: Path | None = typer.Option(None, "--png", help="Write the row's masks and (branch, time) grid."),
    as_json: bool = typer.Option(False, "--json", help="Print the facts as one JSON document."),
    batch_size: int = typer.Option(
        DEFAULT_BATCH_SIZE, "--batch-size", min=1, help="Batch size for the padding-waste estimate."
    ),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Tokenizer dir or hub id for text (default: the manifest's, if here)."
    ),
    chat_template: Path | None = options.CHAT_TEMPLATE,
    # A records file is read and packed exactly as `plora tokenize` would with the same flags.
    branches: int | None = options.BRANCHES,
    min_branches: int | None = options.MIN_BRANCHES,
    max_branches: int = options.MAX_BRANCHES,
    max_seq_len: int = options.MAX_SEQ_LEN,
    align: str = options.ALIGN,
    seed: int = options.SEED,
    no_train_trunk: bool = options.NO_TRAIN_TRUNK,
    fmt: str = options.FORMAT,
    mode: str = options.MODE,
    txt_split: str = options.TXT_SPLIT,
    drop_empty_branches: bool = options.DROP_EMPTY_BRANCHES,
) -> None:
    """Validate and describe shards (or a records file packed on the fly): totals, one row, its masks.

    A records file is read and packed with `plora tokenize`'s options (--branches ... --txt-split).
    """
    err = Console(stderr=True)
    if not path.exists():
        raise PloraError(f"{path}: no such shard directory or records file")
    if not path.is_dir() and tokenizer is None:
        raise PloraError(f"{path}: a records file is packed with a tokenizer: pass --tokenizer DIR")
    if png is not None:
        check_png_target(png)
    given = load_tokenizer(tokenizer, chat_template) if tokenizer is not None else None
    if path.is_dir():
        facts, packed, used = _inspect_shards(path, row, batch_size, given, chat_template, err)
    else:
        packing = options.packing_options(
            branches=branches,
            min_branches=min_branches,
            max_branches=max_branches,
            max_seq_len=max_seq_len,
            align=align,
            seed=seed,
            no_train_trunk=no_train_trunk,
        )
        convert = ConvertOptions(
            fmt=fmt, mode=mode, txt_split=txt_split, drop_empty_branches=drop_empty_branches
        )
        facts, packed = _inspect_records(path, row, batch_size, given, packing, convert, err)
        used = given

    decode = _decoder(used) if used is not None else None
    facts["row"] = row_facts(packed, row, decode)
    facts["png"] = None
    if png is not None:
        title = f"{path} - row {row} of {facts['totals']['rows']:,}"
        view = row_view(packed)
        facts["png"] = str(write_row_png(png, facts, view, token_texts(view, decode), title=title))
    if as_json:
        json.dump(facts, sys.stdout, ensure_ascii=False, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        _print_facts(Console(), facts)


def _check_row(index: int, rows: int, what: str) -> None:
    if not 0 <= index < rows:
        raise PloraError(f"--row {index} is out of range: {what} has {rows:,} rows (0..{rows - 1})")


def _inspect_shards(
    directory: Path, index: int, batch_size: int, given: Any, chat_template: Path | None, err: Console
) -> tuple[dict[str, Any], PackedRow, Any]:
    """Verify the directory and read its totals and one row. The tokenizer is the one given, else
    the one the manifest names when it is on this machine; either must be the shards' own."""
    with err.status(f"verifying {directory} (sha256 of every file)"):
        shards = open_shards(directory, verify=True)
    _check_row(index, len(shards), str(directory))
    meta = shards.metadata()
    _check_totals(shards.manifest, meta, directory)

    source: dict[str, Any] = {"kind": "shards", "path": str(directory), "verified": True}
    named = shards.manifest.tokenizer["name_or_path"]
    tokenizer = given
    if tokenizer is None and named and Path(named).is_dir():
        tokenizer = load_tokenizer(named, chat_template)
    if tokenizer is not None:
        shards.check_tokenizer(tokenizer)  # another vocabulary would show the wrong text
        source["tokenizer"] = str(tokenizer.name_or_path)
    else:
        source["tokenizer"] = None
        source["note"] = f"tokenizer {named!r} is not on this machine: showing token ids (pass --tokenizer)"
    facts = {
        "source": source,
        "manifest": manifest_facts(shards.manifest),
        "totals": totals_facts(meta, batch_size),
    }
    return facts, shards.row(index), tokenizer


def _check_totals(manifest: Manifest, meta: dict[str, np.ndarray], directory: Path) -> None:
    """The rows' metadata must add up to the manifest's counts, or the files are not what it describes."""
    for key, said in (("num_tokens", manifest.num_tokens), ("num_trained", manifest.num_trained)):
        total = int(meta[key].astype(np.int64).sum())
        if total != said:
            raise ShardError(f"{directory}: the manifest says {key} {said}, the rows hold {total}")


def _inspect_records(
    path: Path,
    index: int,
    batch_size: int,
    tokenizer: Any,
    packing: PackingOptions,
    convert: ConvertOptions,
    err: Console,
) -> tuple[dict[str, Any], PackedRow]:
    """Pack a records file in memory as `plora tokenize` would, keeping only metadata and one row."""
    chosen: list[PackedRow] = []

    def keep_chosen(rows: Iterator[PackedRow], status: Status) -> Iterator[PackedRow]:
        for i, packed in enumerate(rows):
            if i == index:
                chosen.append(packed)
            status.update(f"packing {path} (nothing is written): {i + 1:,} rows")
            yield packed

    rejects = Rejects("raise")
    with err.status(f"packing {path} (nothing is written)") as status:
        records = iter_records([path], convert, rejects)
        meta = rows_metadata(keep_chosen(pack_records(records, tokenizer, packing, rejects), status))
    _check_row(index, len(meta["num_tokens"]), f"{path} packed")
    source = {
        "kind": "records",
        "path": str(path),
        "tokenizer": str(tokenizer.name_or_path),
        "packing": packing.to_json(),
        "convert": {"format": convert.fmt, "mode": convert.mode, "txt_split": convert.txt_split},
    }
    return {"source": source, "manifest": None, "totals": totals_facts(meta, batch_size)}, chosen[0]


def _decoder(tokenizer: Any) -> Decode:
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


# --------------------------------------------------------------------------------------
# Terminal output
# --------------------------------------------------------------------------------------


def _print_facts(console: Console, facts: dict[str, Any]) -> None:
    source = facts["source"]
    if source["kind"] == "shards":
        console.print(f"[bold]{escape(source['path'])}[/]: manifest and sha256 of every file verified")
        _print_manifest(console, facts["manifest"])
    else:
        where = f"[bold]{escape(source['path'])}[/]"
        console.print(f"{where}: packed in memory with {escape(source['tokenizer'])}, nothing written")
        console.print("packing: " + ", ".join(f"{k}={v}" for k, v in source["packing"].items()))
    if source.get("note"):
        console.print(f"[yellow]{escape(source['note'])}[/]")
    _print_totals(console, facts["totals"])
    _print_row(console, facts["row"])
    if facts.get("png"):
        console.print(f"picture written to {escape(facts['png'])}")


def _print_manifest(console: Console, manifest: dict[str, Any]) -> None:
    table = Table(title="manifest", show_header=False, title_justify="left")
    tokenizer = manifest["tokenizer"]
    table.add_row("format / plora", f"v{manifest['format_version']} / {manifest['plora_version']}")
    vocab = f"vocab {tokenizer['vocab_size']:,}, vocab_sha256 {tokenizer['vocab_sha256'][:12]}"
    table.add_row("tokenizer", f"{tokenizer['name_or_path']} ({vocab})")
    template = manifest["chat_template"]
    own = "the tokenizer's own" if template["template"] is not None else "none"
    table.add_row("chat template", template["file"] or own)
    for part in ("packing", "convert"):
        if manifest[part]:
            table.add_row(part, ", ".join(f"{k}={v}" for k, v in manifest[part].items()))
    table.add_row("fingerprint", str(manifest["fingerprint"]))
    files = manifest["files"]
    for f in files[:MAX_FILES_LISTED]:
        counts = f"{f['rows']:,} rows, {f['tokens']:,} tokens, sha256 {f['sha256'][:12]}"
        table.add_row("file", f"{f['name']}: {counts}")
    if len(files) > MAX_FILES_LISTED:
        table.add_row("", f"... and {len(files) - MAX_FILES_LISTED:,} more files (--json lists them all)")
    console.print(table)


def _print_totals(console: Console, totals: dict[str, Any]) -> None:
    table = Table(title="totals", show_header=False, title_justify="left")
    table.add_row("rows", f"{totals['rows']:,} ({totals['rows_with_trunk']:,} with a trunk)")
    table.add_row(
        "tokens",
        f"{totals['tokens']:,}, trained {totals['trained_tokens']:,} ({totals['trained_fraction']:.1%})",
    )
    per_row = totals["tokens_per_row"]
    spread = f"min {per_row['min']:,}, mean {per_row['mean']:,.1f}, max {per_row['max']:,}"
    table.add_row("tokens per row", spread)
    histogram = totals["branches_histogram"].items()
    table.add_row("branches per row", ", ".join(f"K={k}: {n:,} row{'s' * (n != 1)}" for k, n in histogram))
    waste = totals["padding_waste"]
    table.add_row(
        f"padding, batches of {waste['batch_size']}",
        f"{waste['stored_order']:.1%} wasted in stored order, "
        f"{waste['grouped_by_length']:.1%} grouped by length",
    )
    console.print(table)


def _print_row(console: Console, row: dict[str, Any]) -> None:
    trunk = f"trunk of {row['trunk_len']} tokens + " if row["has_trunk"] else ""
    table = Table(
        title=f"row {row['index']}: {trunk}{row['num_branches']} branches, {row['tokens']:,} tokens "
        f"({row['trained_tokens']:,} trained), {row['time_span']} time steps",
        title_justify="left",
    )
    for name in ("branch_id", "role", "time", "tokens", "trained"):
        table.add_column(name, justify="right" if name != "role" else "left", no_wrap=True)
    table.add_column("text" if row["sequences"][0]["text"] is not None else "token ids", overflow="fold")
    for s in row["sequences"]:
        shown = s["text"] if s["text"] is not None else " ".join(map(str, s["ids"]))
        if len(shown) > TEXT_PREVIEW_CHARS:
            shown = shown[:TEXT_PREVIEW_CHARS] + f"… (+{len(shown) - TEXT_PREVIEW_CHARS:,} chars)"
        table.add_row(
            str(s["branch_id"]),
            s["role"],
            f"{s['time_start']}..{s['time_end']}",
            f"{s['tokens']:,}",
            f"{s['trained_tokens']:,}",
            Text(shown.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")),
        )
    console.print(table)

    masks = Table(title="attention masks of this row", title_justify="left")
    for name in ("mode", "visible pairs", "density", "causal pairs", "dense float32", "dense bool"):
        masks.add_column(name, justify="left" if name == "mode" else "right")
    for mode, m in row["masks"].items():
        masks.add_row(
            mode,
            f"{m['visible_pairs']:,}",
            f"{m['density']:.1%}",
            f"{m['causal_pairs']:,}",
            human_bytes(m["dense_float32_bytes"]),
            human_bytes(m["dense_bool_bytes"]),
        )
    console.print(masks)
