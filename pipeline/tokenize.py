"""`plora tokenize`: tokenize canonical records, pack them into rows and write a shard directory.

What each record becomes is :mod:`pipeline.encode`'s job; the resume journal is
:mod:`pipeline.journal`'s; this module runs the job.

Records are tokenized in batches (the Rust tokenizer's batch mode), optionally in a pool of
worker processes whose results are consumed in input order, so the shards do not depend on
``--num-proc``. Memory stays bounded: records stream in, a bounded number of batches are in
flight, at most one shard's rows are held, and a long text is tokenized in pieces cut where that
gives the same tokens (the tokenizer needs about a hundred bytes per character of what it is given).

A :class:`ShardWriter` holds the rows until a shard's worth is there, writes the shard and then the
journal, so that ``--resume`` continues from the last shard written (see :mod:`pipeline.journal`).
``manifest.json`` is written last; until then the directory is incomplete.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parallel import atomic
from parallel.errors import PloraError, Rejects
from parallel.fingerprint import plora_version, run_fingerprint, tokenizer_identity
from parallel.layout import PackedRow, Packer, PackingOptions, PackItem
from parallel.tokenizer import load_tokenizer
from pipeline.convert import (
    ConvertOptions,
    ConvertSummary,
    SourcedRecord,
    input_fingerprint_parts,
    iter_records,
)
from pipeline.encode import RecordEncoder, Rejected, batches
from pipeline.journal import Journal, start_state
from pipeline.progress import InputMeter, ProgressLine
from pipeline.readers import check_readable
from pipeline.shards import JOURNAL_NAME, Manifest, ShardFile, open_shards, write_manifest, write_shard

__all__ = [
    "DEFAULT_ROWS_PER_SHARD",
    "ShardWriter",
    "TokenizeJob",
    "TokenizeSummary",
    "pack_records",
    "tokenize_to_shards",
]

DEFAULT_ROWS_PER_SHARD = 2048
ENCODE_BATCH = 1000  # records per tokenizer call: large enough for the Rust batch mode to pay off
BATCHES_IN_FLIGHT_PER_WORKER = 2


def _raise_or_reject(result: Rejected, rejects: Rejects) -> None:
    if result.fatal:
        raise PloraError(result.reason)
    rejects.reject(result.source, result.line, result.reason)


# Worker-process side of --num-proc (module level so that the spawn start method can find it).
_WORKER_ENCODER: RecordEncoder | None = None


def _worker_init(tokenizer_path: str, chat_template: str | None, options: PackingOptions) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _WORKER_ENCODER = RecordEncoder(load_tokenizer(tokenizer_path, chat_template), options)


def _worker_encode(batch: list[SourcedRecord]) -> list[PackItem | Rejected]:
    assert _WORKER_ENCODER is not None, "worker not initialised"
    return _WORKER_ENCODER.encode(batch)


@contextlib.contextmanager
def _children_ignore_ctrl_c() -> Iterator[None]:
    """Processes started here begin with SIGINT ignored (an ignored signal stays ignored across exec).
    Ctrl-C in a terminal reaches the whole process group; only the parent acts on it, by terminating
    the pool: a worker that died of it mid-task would leave the parent waiting for its result forever."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _encoded(
    records: Iterable[SourcedRecord],
    encoder: RecordEncoder,
    *,
    num_proc: int = 1,
    tokenizer_path: str | Path | None = None,
    chat_template: str | Path | None = None,
) -> Iterator[PackItem | Rejected]:
    """One result per record, in input order, whatever ``num_proc``. A pool needs the tokenizer's
    path (workers load their own); at most ``2 * num_proc`` batches are in flight."""
    if num_proc <= 1:
        for batch in batches(records, ENCODE_BATCH):
            yield from encoder.encode(batch)
        return
    if tokenizer_path is None:
        raise ValueError("num_proc > 1 needs tokenizer_path")
    import multiprocessing  # noqa: PLC0415

    context = multiprocessing.get_context("spawn")
    template = None if chat_template is None else str(chat_template)
    with _children_ignore_ctrl_c():
        pool = context.Pool(
            num_proc, initializer=_worker_init, initargs=(str(tokenizer_path), template, encoder.options)
        )
    with pool:
        in_flight: deque[Any] = deque()
        for batch in batches(records, ENCODE_BATCH):
            in_flight.append(pool.apply_async(_worker_encode, (batch,)))
            if len(in_flight) >= BATCHES_IN_FLIGHT_PER_WORKER * num_proc:
                yield from in_flight.popleft().get()
        while in_flight:
            yield from in_flight.popleft().get()


def pack_records(
    records: Iterable[SourcedRecord], tokenizer: Any, options: PackingOptions, rejects: Rejects
) -> Iterator[PackedRow]:
    """Tokenize records in batches and pack them into rows (in memory; no shards, no resume)."""
    encoder = RecordEncoder(tokenizer, options)
    packer = Packer(options, encoder.special)
    for result in _encoded(records, encoder):
        if isinstance(result, Rejected):
            _raise_or_reject(result, rejects)
            continue
        yield from packer.add(result)
    yield from packer.finish()


@dataclass(frozen=True)
class TokenizeJob:
    """Everything `plora tokenize` was asked to do."""

    inputs: tuple[Path, ...]
    tokenizer: str | Path  # a local directory or a hub id (see parallel.pretrained)
    out: Path
    packing: PackingOptions = field(default_factory=PackingOptions)
    convert: ConvertOptions = field(default_factory=ConvertOptions)
    hf_dataset: str | None = None
    chat_template: Path | None = None
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    num_proc: int = 1
    resume: bool = False
    overwrite: bool = False

    def options_json(self) -> dict[str, Any]:
        """Every option that changes the shards (part of the fingerprint)."""
        c = self.convert
        return {
            "packing": self.packing.to_json(),
            "convert": {
                "format": c.fmt,
                "mode": c.mode,
                "txt_split": c.txt_split,
                "hf_subset": c.hf_subset,
                "hf_split": c.hf_split,
                "drop_empty_branches": c.drop_empty_branches,
            },
            "rows_per_shard": self.rows_per_shard,
        }


@dataclass
class TokenizeSummary:
    out: Path
    up_to_date: bool = False
    resumed_from: int = 0  # shards already written by an interrupted run
    records_in: int = 0
    records_out: int = 0
    records_rejected: int = 0
    rows: int = 0
    tokens: int = 0
    trained: int = 0
    shards: int = 0
    seconds: float = 0.0
    tokens_this_run: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what packing changed (see packing_notes)

    def lines(self, rejects_path: Path | None = None) -> list[str]:
        if self.up_to_date:
            return [f"plora tokenize: {self.out} is up to date ({self.rows:,} rows, {self.tokens:,} tokens)"]
        rate = self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0
        resumed = f" (resumed after {self.resumed_from} shards)" if self.resumed_from else ""
        lines = [
            f"plora tokenize: {self.records_in:,} records in, {self.records_out:,} out, "
            f"{self.records_rejected:,} rejected -> {self.rows:,} rows, {self.tokens:,} tokens "
            f"({self.trained:,} trained) in {self.shards} shards{resumed}, {self.seconds:.1f}s, "
            f"{rate:,.0f} tokens/s -> {self.out}"
        ]
        if self.rejected:
            where = f" (details in {rejects_path})" if rejects_path is not None else ""
            reasons = ", ".join(f"{k} {n:,}" for k, n in sorted(self.rejected.items(), key=lambda kv: -kv[1]))
            lines.append(f"  rejected: {reasons}{where}")
        if self.notes:
            lines.append(f"  packing: {'; '.join(self.notes)}")
        return lines


def packing_notes(counts: dict[str, int], options: PackingOptions, dropped_branches: int) -> list[str]:
    """What packing did to records besides packing them (Packer.counts, and empty branches dropped),
    in words; nothing that did not happen."""
    notes = []
    if counts["branches_split"]:
        notes.append(
            f"{counts['branches_split']:,} branches longer than --max-seq-len {options.max_seq_len} "
            f"split into {counts['split_pieces']:,} pieces"
        )
    if counts["rows_above_k"]:
        notes.append(
            f"{counts['rows_above_k']:,} parallel rows above --branches {options.branches} "
            "(kept whole; --min-branches/--max-branches caps them)"
        )
    if counts["wide_split"]:
        notes.append(
            f"{counts['wide_split']:,} parallel records wider than --max-branches {options.max_branches} "
            f"split into {counts['wide_rows']:,} rows (trunk repeated, trained once)"
        )
    if dropped_branches:
        notes.append(f"{dropped_branches:,} empty branches dropped")
    return notes


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".plora-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PloraError(f"{out}: cannot write the shard directory: {err.strerror or err}") from None


class ShardWriter:
    """The run's state between the packer and the shard directory: rows wait until a shard's worth
    is there; after each shard the journal is saved, so that a killed run resumes exactly there."""

    def __init__(self, out: Path, rows_per_shard: int, digest: str, packer: Packer, journal: Journal | None):
        self.out, self.rows_per_shard, self.digest, self.packer = out, rows_per_shard, digest, packer
        self.files: list[ShardFile] = list(journal.files) if journal else []
        self.consumed = journal.records_consumed if journal else 0  # records read, rejected ones too
        self.buffer: list[PackedRow] = list(journal.buffer) if journal else []
        self.encode_rejects: list[list[Any]] = list(journal.encode_rejects) if journal else []
        self.rows_done = len(self.buffer) + sum(f.rows for f in self.files)
        self.tokens_this_run = 0

    def reject(self, result: Rejected) -> None:
        self.encode_rejects.append([result.source, result.line, result.reason])

    def add(self, rows: list[PackedRow], *, final: bool = False) -> None:
        """Take the packer's rows and write every full shard (with ``final``, the rest too)."""
        self.buffer.extend(rows)
        self.rows_done += len(rows)
        self.tokens_this_run += sum(r.num_tokens for r in rows)
        while len(self.buffer) >= self.rows_per_shard or (final and self.buffer):
            shard, self.buffer = self.buffer[: self.rows_per_shard], self.buffer[self.rows_per_shard :]
            self.files.append(write_shard(self.out, len(self.files), shard))
            if not final or self.buffer:
                self._save_journal()

    def _save_journal(self) -> None:
        state = Journal(
            self.digest, self.files, self.consumed, self.packer.state(), self.buffer, self.encode_rejects
        )
        atomic.write_bytes(self.out / JOURNAL_NAME, state.to_bytes())


def _check_job(job: TokenizeJob) -> None:
    if job.rows_per_shard < 1:
        raise PloraError("--rows-per-shard must be at least 1")
    if job.num_proc < 1:
        raise PloraError("--num-proc must be at least 1")
    if not job.inputs and job.hf_dataset is None:
        raise PloraError("no input: give INPUT files")
    for path in job.inputs:  # fail before the tokenizer loads and before anything is created
        check_readable(Path(path))


def tokenize_to_shards(
    job: TokenizeJob, rejects: Rejects, *, progress: bool | None = None
) -> TokenizeSummary:
    """Run `plora tokenize` (see the module docstring). ``progress`` None: when stderr is a terminal."""
    started = time.monotonic()
    _check_job(job)
    tokenizer = load_tokenizer(job.tokenizer, job.chat_template)
    _prepare_out(job.out)
    # transformers brings torch's millions of long-lived objects; keep them out of every garbage
    # collection of the many small objects tokenizing makes (a large share of the time otherwise).
    gc.freeze()
    encoder = RecordEncoder(tokenizer, job.packing)
    identity = tokenizer_identity(tokenizer)
    # By content and order, not location: the same files elsewhere give the same shards.
    inputs = [
        (Path(name).name, digest)
        for name, digest in input_fingerprint_parts(job.inputs, job.hf_dataset, options=job.convert)
    ]
    fingerprint = run_fingerprint(inputs, identity["sha256"], job.options_json())
    start = start_state(job.out, fingerprint, resume=job.resume, overwrite=job.overwrite)
    summary = TokenizeSummary(out=job.out)
    if isinstance(start, Manifest):
        open_shards(job.out, verify=False)  # the files are there, whole-sized and of the right rows
        summary.up_to_date = True
        summary.rows, summary.tokens = start.num_rows, start.num_tokens
        return summary

    packer = Packer(job.packing, encoder.special, state=start.packer if start else None)
    writer = ShardWriter(job.out, job.rows_per_shard, fingerprint["digest"], packer, start)
    summary.resumed_from = len(writer.files)
    for source, line, reason in writer.encode_rejects:
        rejects.reject(source, line, reason)
    convert_summary = ConvertSummary()
    _write_shards(job, encoder, writer, rejects, convert_summary, progress)
    files = writer.files
    if not files:
        raise PloraError("nothing to tokenize: the inputs hold no records (or every one was rejected)")

    manifest = _manifest(job, tokenizer, identity, encoder, fingerprint, files)
    write_manifest(job.out, manifest)
    (job.out / JOURNAL_NAME).unlink(missing_ok=True)

    summary.records_in = convert_summary.records_in
    summary.records_rejected = rejects.total
    summary.records_out = writer.consumed - len(writer.encode_rejects)
    summary.rejected = dict(rejects.counts)
    summary.rows, summary.tokens, summary.trained = (
        manifest.num_rows,
        manifest.num_tokens,
        manifest.num_trained,
    )
    summary.shards = len(files)
    summary.tokens_this_run = writer.tokens_this_run
    summary.notes = packing_notes(packer.counts, job.packing, convert_summary.dropped_branches)
    summary.seconds = time.monotonic() - started
    return summary


def _write_shards(
    job: TokenizeJob,
    encoder: RecordEncoder,
    writer: ShardWriter,
    rejects: Rejects,
    convert_summary: ConvertSummary,
    progress: bool | None,
) -> None:
    """Encode and pack the records the writer has not consumed yet, into shards, with a live line of
    records, rows, tokens, tokens/s and, where the inputs are files, a bar and ETA by input bytes."""
    records = iter_records(job.inputs, job.convert, rejects, job.hf_dataset, summary=convert_summary)
    bar = ProgressLine("tokenize", enabled=progress)
    meter = InputMeter(job.inputs) if bar.enabled else None
    if meter is not None:
        records = meter.tap(records)
        bar.update(total=meter.total or None)
    results = _encoded(
        itertools.islice(records, writer.consumed, None),
        encoder,
        num_proc=job.num_proc,
        tokenizer_path=job.tokenizer,
        chat_template=job.chat_template,
    )

    def show() -> None:
        rate = writer.tokens_this_run / bar.elapsed
        stats = (
            f"{writer.consumed:,} records  {writer.rows_done:,} rows  "
            f"{writer.tokens_this_run:,} tokens  {rate:,.0f} tok/s"
        )
        bar.update(meter.position if meter else 0, stats=stats)

    with bar:
        for result in results:
            writer.consumed += 1
            if isinstance(result, Rejected):
                _raise_or_reject(result, rejects)
                writer.reject(result)
                continue
            writer.add(writer.packer.add(result))
            if bar.due():
                show()
        writer.add(writer.packer.finish(), final=True)
        show()


def _manifest(
    job: TokenizeJob,
    tokenizer: Any,
    identity: dict[str, Any],
    encoder: RecordEncoder,
    fingerprint: dict[str, Any],
    files: list[ShardFile],
) -> Manifest:
    return Manifest(
        plora_version=plora_version(),
        tokenizer=identity,
        # What rendered the chats (file None: the tokenizer's own); readers never need it to read ids.
        chat_template={
            "file": str(Path(job.chat_template).resolve()) if job.chat_template is not None else None,
            "template": tokenizer.chat_template,
        },
        special_tokens={"eos_id": encoder.special.eos_id, "bos_id": encoder.special.bos_id},
        packing=job.packing.to_json(),
        convert=job.options_json()["convert"],
        rows_per_shard=job.rows_per_shard,
        fingerprint=fingerprint,
        files=tuple(files),
        num_rows=sum(f.rows for f in files),
        num_tokens=sum(f.tokens for f in files),
        num_trained=sum(f.trained for f in files),
    )
