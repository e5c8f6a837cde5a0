"""`plora convert`: read SFT and plain-text data of many shapes, write canonical records.

Inputs are read by :mod:`pipeline.readers` (one container format each, in bounded memory),
each raw record is recognised and normalised by :mod:`pipeline.formats`, and every record
that fails goes through :class:`parallel.errors.Rejects`: a one-line error in ``raise`` mode,
a line of the rejects file and a count in ``skip`` mode. Every raw record is either written
or rejected, so ``records in == records out + rejected`` (``--group-by`` writes one record per
group, and its summary line counts the records that went into each). An empty input is not an
error: it gives no records, and the summary says so ("no records found").
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from parallel import atomic
from parallel.errors import PloraError, Rejects
from parallel.fingerprint import file_sha256
from parallel.layout import Record, RecordError, record_to_line
from pipeline import formats, grouping, lists
from pipeline.chat_parallel import ParallelCounts
from pipeline.progress import ProgressLine
from pipeline.readers import TXT_SPLITS, RawRecord, check_readable, hf_source, read_file, read_hf_dataset

PROGRESS_EVERY = 256  # records between progress updates; keeps the bar's cost negligible


@dataclass(frozen=True)
class ConvertOptions:
    fmt: str = "auto"  # auto | one of formats.FORMATS
    mode: str = "sft"  # sft | pretrain (pretrain flattens chats to {"text"}; parallel records stay)
    txt_split: str = "blank"  # blank | line: plain .txt gives one doc per blank-line block, or per line
    hf_subset: str | None = None
    hf_split: str = "train"
    streaming: bool = False
    # Drop the empty branches of a parallel record (counted) instead of rejecting the whole record.
    drop_empty_branches: bool = False
    # Converters to parallel records (convert only): a list answer's items become branches ...
    split_lists: bool = False
    min_items: int = lists.DEFAULT_MIN_ITEMS
    # ... or records sharing these fields become branches of one record, at most max_branches each.
    group_by: tuple[str, ...] = ()
    max_branches: int = grouping.DEFAULT_MAX_BRANCHES

    def __post_init__(self) -> None:
        choices = {
            "--format": (self.fmt, ("auto", *formats.FORMATS)),
            "--mode": (self.mode, formats.MODES),
            "--txt-split": (self.txt_split, TXT_SPLITS),
        }
        for flag, (value, allowed) in choices.items():
            if value not in allowed:
                raise PloraError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")
        if self.min_items < 2:
            raise PloraError(f"--min-items must be at least 2; got {self.min_items}")
        if self.max_branches < 2:
            raise PloraError(f"--max-branches must be at least 2; got {self.max_branches}")
        if (self.split_lists or self.group_by) and self.mode != "sft":
            raise PloraError("--split-lists and --group-by write chat parallel records; they need --mode sft")
        if self.split_lists and self.group_by:
            raise PloraError("--split-lists and --group-by are two different conversions; pass one")


@dataclass(frozen=True)
class SourcedRecord:
    # A dict is the JSON object of a chat parallel record (pipeline.chat_parallel), which only
    # the converters to parallel records write.
    record: Record | dict[str, Any]
    source: str
    line: int | None


@dataclass
class InputCounts:
    read: int = 0
    written: int = 0
    rejected: int = 0


@dataclass
class ConvertSummary:
    """What a conversion did: counts per input, formats seen, rejects by reason."""

    inputs: dict[str, InputCounts] = field(default_factory=dict)
    formats: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    dropped_branches: int = 0  # empty branches dropped (--drop-empty-branches)
    parallel: ParallelCounts | None = None  # --split-lists or --group-by
    seconds: float = 0.0

    @property
    def records_in(self) -> int:
        return sum(c.read for c in self.inputs.values())

    @property
    def records_out(self) -> int:
        return sum(c.written for c in self.inputs.values())

    @property
    def records_rejected(self) -> int:
        return sum(c.rejected for c in self.inputs.values())

    def lines(self, out: Path | None = None, rejects_path: Path | None = None) -> list[str]:
        """The human summary printed at the end of `plora convert`."""
        target = f" -> {out}" if out is not None else ""
        lines = [
            f"plora convert: {self.records_in:,} records in, {self.records_out:,} out, "
            f"{self.records_rejected:,} rejected in {self.seconds:.1f}s{target}"
        ]
        for source, c in self.inputs.items():
            empty = " (no records found)" if c.read == 0 else ""
            lines.append(f"  {source}: {c.read:,} in, {c.written:,} out, {c.rejected:,} rejected{empty}")
        if self.formats:
            lines.append("  formats: " + ", ".join(f"{name} {n:,}" for name, n in self.formats.most_common()))
        if self.rejected:
            where = f" (details in {rejects_path})" if rejects_path is not None else ""
            reasons = ", ".join(f"{reason} {n:,}" for reason, n in self.rejected.most_common())
            lines.append(f"  rejected: {reasons}{where}")
        if self.dropped_branches:
            lines.append(f"  {self.dropped_branches:,} empty branches dropped")
        if self.parallel is not None:
            lines.append(self.parallel.line())
        return lines


def iter_records(
    inputs: Sequence[str | Path],
    options: ConvertOptions,
    rejects: Rejects,
    hf_dataset: str | None = None,
    *,
    summary: ConvertSummary | None = None,
) -> Iterator[SourcedRecord]:
    """Canonical records of all inputs, in input order (files first, then the dataset).

    Bad records go through ``rejects.reject`` (which raises InputError in ``raise`` mode).
    Missing, unreadable or unsupported inputs raise PloraError before anything is read.
    ``summary``, when given, is filled with counts as the records stream by.
    """
    paths = [Path(p) for p in inputs]
    if not paths and hf_dataset is None:
        raise PloraError("no input: give INPUT files or --hf-dataset NAME")
    for path in paths:
        check_readable(path)
    summary = summary if summary is not None else ConvertSummary()
    for path in paths:
        summary.inputs.setdefault(str(path), InputCounts())
        yield from _normalised(read_file(path, options.txt_split), options, rejects, summary)
    if hf_dataset is not None:
        raws = read_hf_dataset(hf_dataset, options.hf_subset, options.hf_split, options.streaming)
        summary.inputs.setdefault(hf_source(hf_dataset, options.hf_split), InputCounts())
        yield from _normalised(raws, options, rejects, summary)


def _normalised(
    raws: Iterator[RawRecord], options: ConvertOptions, rejects: Rejects, summary: ConvertSummary
) -> Iterator[SourcedRecord]:
    for raw in raws:
        counts = summary.inputs.setdefault(raw.source, InputCounts())
        counts.read += 1
        record: Record | dict[str, Any]
        try:
            fmt, record, dropped = _canonical(raw, options)
            if options.split_lists:
                record = _split_lists(record, options.min_items, summary.parallel)
        except RecordError as err:
            what = raw.raw if raw.error is not None else raw.value
            rejects.reject(raw.source, raw.line, str(err), what, raw.index)
            counts.rejected += 1
            continue
        counts.written += 1
        summary.formats[fmt] += 1
        summary.dropped_branches += dropped
        yield SourcedRecord(record, raw.source, raw.line)


def _iter_grouped(
    inputs: Sequence[str | Path],
    options: ConvertOptions,
    rejects: Rejects,
    hf_dataset: str | None,
    summary: ConvertSummary,
) -> Iterator[SourcedRecord]:
    """The records of --group-by, input by input (a group never spans two inputs)."""
    if hf_dataset is not None:
        raise PloraError("--group-by reads data files (a lazy polars scan); it cannot read --hf-dataset")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise PloraError("no input: give INPUT files")
    for path in paths:
        check_readable(path)
    counts = summary.parallel
    assert counts is not None, "convert() sets summary.parallel for --group-by"
    for path in paths:
        source = summary.inputs.setdefault(str(path), InputCounts())
        read, rejected = counts.records_in, rejects.total
        for row, record in grouping.group_file(path, options.group_by, options.max_branches, rejects, counts):
            source.written += 1
            yield SourcedRecord(record, str(path), row)
        source.read += counts.records_in - read
        source.rejected += rejects.total - rejected


def _split_lists(record: Record, min_items: int, counts: ParallelCounts | None) -> Record | dict[str, Any]:
    """The chat parallel record of a list answer, or the record as it was (counted either way)."""
    assert counts is not None, "convert() sets summary.parallel for --split-lists"
    split = lists.split_record(record, min_items)
    counts.records_in += 1
    if isinstance(split, str):
        counts.kept[split] += 1
        return record
    counts.parallel_out += 1
    counts.branches += len(split["branches"])
    return split


def _canonical(raw: RawRecord, options: ConvertOptions) -> tuple[str, Record, int]:
    """(format, canonical record, empty branches dropped) of a raw record; RecordError says why
    there is none."""
    if raw.error is not None:
        raise RecordError(raw.error)
    fmt = formats.detect(raw.value) if options.fmt == "auto" else options.fmt
    if fmt is None:
        raise RecordError(formats.unknown_format_reason(raw.value, raw.nulls))
    empty = formats.empty_branches(raw.value) if fmt == "canonical" else []
    if empty and options.drop_empty_branches:
        kept = [b for i, b in enumerate(raw.value["branches"]) if i not in empty]
        if not kept:
            raise RecordError(f"invalid record: all {len(empty)} branches are empty; nothing to train")
        return fmt, formats.normalise({**raw.value, "branches": kept}, fmt, options.mode), len(empty)
    try:
        return fmt, formats.normalise(raw.value, fmt, options.mode), 0
    except RecordError as err:
        if not empty:
            raise
        raise RecordError(
            f"{err}; an empty branch rejects the whole parallel record "
            "(--drop-empty-branches drops only the empty branches, counted)"
        ) from None


def convert(
    inputs: Sequence[str | Path],
    out: str | Path | None,
    options: ConvertOptions,
    rejects: Rejects,
    hf_dataset: str | None = None,
    *,
    progress: bool | None = None,
) -> ConvertSummary:
    """Write the canonical JSONL of all inputs to ``out`` (atomically) or to stdout when None.

    ``progress`` shows a live record count on stderr; None means "when stderr is a terminal".
    On any error the output is not written (nothing half-done is left under ``out``).
    """
    started = time.monotonic()
    out_path = Path(out) if out is not None else None
    summary = ConvertSummary()
    if options.split_lists:
        summary.parallel = ParallelCounts("--split-lists")
    if options.group_by:
        summary.parallel = ParallelCounts(f"--group-by {','.join(options.group_by)}")
        items = _iter_grouped(inputs, options, rejects, hf_dataset, summary)
    else:
        items = iter_records(inputs, options, rejects, hf_dataset, summary=summary)
    try:
        bar = ProgressLine("convert", enabled=progress, bar=False, transient=True)
        with _output(out_path) as write, bar:
            for done, item in enumerate(items, 1):
                write(_line(item.record) + "\n")
                if done % PROGRESS_EVERY == 0:
                    bar.update(done, stats=f"{done:,} records  {done / bar.elapsed:,.0f} records/s")
    finally:
        rejects.close()
    summary.rejected = Counter(rejects.counts)
    summary.seconds = time.monotonic() - started
    return summary


def _line(record: Record | dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) if isinstance(record, dict) else record_to_line(record)


def check_output_path(path: Path) -> None:
    """One-line PloraError for output paths that cannot be files (before any work is done)."""
    if path.is_dir():
        raise PloraError(f"{path}: is a directory; expected an output file path")
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise PloraError(f"{path}: cannot write: {existing} is not a directory")


def default_rejects_path(out: Path) -> Path:
    """``data/out.jsonl`` -> ``data/out.rejects.jsonl``."""
    return out.with_name(out.name.removesuffix(out.suffix) + ".rejects.jsonl")


def open_rejects(on_error: str, out: Path | None, rejects_path: Path | None = None) -> Rejects:
    """The Rejects of a run. In ``skip`` mode the rejects file (default next to ``out``) is
    created empty up front, so that a stale one never survives and an unwritable path fails
    before any work."""
    if on_error == "raise":
        return Rejects("raise")
    if on_error != "skip":
        raise PloraError(f"--on-error must be raise or skip, got {on_error!r}")
    if rejects_path is None:
        if out is None:
            raise PloraError("--on-error skip with output to stdout needs --rejects FILE")
        rejects_path = default_rejects_path(out)
    check_output_path(rejects_path)
    try:
        rejects_path.parent.mkdir(parents=True, exist_ok=True)
        rejects_path.write_bytes(b"")
    except OSError as err:
        raise PloraError(f"{rejects_path}: cannot write the rejects file: {err.strerror or err}") from err
    return Rejects("skip", rejects_path)


def input_fingerprint_parts(
    inputs: Sequence[str | Path], hf_dataset: str | None = None, *, options: ConvertOptions | None = None
) -> list[tuple[str, str]]:
    """(name, sha256) per input: the bytes of each file; for a local dataset folder, every
    file under it (relative path and bytes). A hub dataset is not on disk, so it is identified
    by its name, subset and split only."""
    parts = [(str(path), _file_sha256(Path(path))) for path in inputs]
    if hf_dataset is not None:
        options = options or ConvertOptions()
        name = f"{hf_dataset}[{options.hf_subset or ''}:{options.hf_split}]"
        folder = Path(hf_dataset)
        digest = hashlib.sha256()
        if folder.is_dir():
            for file in sorted(p for p in folder.rglob("*") if p.is_file()):
                digest.update(f"{file.relative_to(folder).as_posix()}\0{_file_sha256(file)}\0".encode())
        else:
            digest.update(name.encode())
        parts.append((name, digest.hexdigest()))
    return parts


def _file_sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as err:
        raise PloraError(f"{path}: cannot read: {err.strerror or err}") from err


@contextmanager
def _output(out: Path | None) -> Iterator[Callable[[str], None]]:
    """A write function for the output: stdout, or a temporary file beside ``out`` that
    replaces ``out`` (after fsync) only when the whole conversion succeeded."""
    if out is None:
        yield _checked_writer(sys.stdout, "stdout")
        try:
            sys.stdout.flush()
        except OSError as err:
            raise _write_error("stdout", err) from err
        return
    check_output_path(out)
    with ExitStack() as stack:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            f = stack.enter_context(atomic.open_atomic(out, "w"))
        except OSError as err:
            raise PloraError(f"{out}: cannot write: {err.strerror or err}") from err
        yield _checked_writer(f, str(out))
        try:
            stack.close()  # fsync, rename into place
        except OSError as err:
            raise _write_error(str(out), err) from err


def _checked_writer(f: IO[str], name: str) -> Callable[[str], None]:
    def write(text: str) -> None:
        try:
            f.write(text)
        except OSError as err:  # a full disk, a closed pipe
            raise _write_error(name, err) from err

    return write


def _write_error(name: str, err: OSError) -> PloraError:
    if isinstance(err, BrokenPipeError):
        # the reader left (`| head`): point stdout at /dev/null so that exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return PloraError(f"{name}: the reader closed the pipe before the end")
    return PloraError(f"{name}: cannot write: {err.strerror or err}")
