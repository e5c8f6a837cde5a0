"""`plora tokenize`: tokenize canonical records, pack them into rows and write a shard directory.

What a record becomes (the contract's Packing section, in token terms; everything is encoded
with ``add_special_tokens=False`` and BOS, where the tokenizer uses one, is added by
:func:`parallel.layout.build_row`):

- text: ``ids(text) + [eos]``, all trained.
- chat: the tokenizer's chat template renders the whole chat once; each assistant turn's span
  is found by rendering prefixes (``messages[:i]`` with the generation prompt, and
  ``messages[:i+1]``), which the full render must start with. A template that is not
  prefix-stable (Qwen3's drops the reasoning of earlier assistant turns) has each assistant
  content searched for in the full render instead, in message order, the span running through
  the end-of-turn marker that follows it; a chat whose assistant content is not rendered verbatim
  is rejected. The span runs from the assistant content through its closing end-of-turn token,
  trailing whitespace excluded; the tokens overlapping a span are trained. When no trained
  token is the EOS (a template whose turns end with another marker), an EOS is appended after
  the render, trained, so generation still learns to stop; a template that closes the assistant
  turn with EOS (ChatML with EOS ``<|im_end|>``) gets none extra.
- parallel: the trunk is ``ids(main)`` with no EOS, trained iff ``train_trunk``; a branch is
  ``ids(prompt + "\n") + ids(response) + [eos]`` (parallel.layout.branch_prompt_text) with the
  response and EOS trained. A trunk longer than ``max_seq_len`` rejects the record: unlike a
  branch it cannot be split.
- chat parallel: the trunk is :func:`chat_trunk` (also generation's trunk under ``--chat``),
  never trained; a branch is what the template renders after the trunk for the branch's turns,
  through the assistant's end of turn, trained from the answer on (``RecordEncoder._chat_branch``).

Every branch then gets its start token from :func:`parallel.layout.build_row` (docs/layout.md).

A chat template that leaves an assistant's text out of its render stops the run: it is the
tokenizer's fault, not the record's.

Records are tokenized in batches (the Rust tokenizer's batch mode), optionally in a pool of
worker processes whose results are consumed in input order, so the shards do not depend on
``--num-proc``. Memory stays bounded: records stream in, a bounded number of batches are in
flight, at most one shard's rows are held, and a long text is tokenized in pieces cut where that
gives the same tokens (the tokenizer needs about a hundred bytes per character of what it is given).

Resume: after each shard is written, a journal (``.progress.npz``, replaced atomically) records
the fingerprint, the finished files, how many records were consumed and everything the packer
held at that point (pending pieces, the next row size, the RNG state, and rows produced but not
yet written). ``--resume`` re-reads the inputs, skips the consumed records without tokenizing
them, restores that state and continues, so the shards come out byte-identical to an
uninterrupted run. ``manifest.json`` is written last; until then the directory is incomplete.
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parallel import atomic, outdir
from parallel.errors import PloraError, Rejects
from parallel.fingerprint import file_sha256, plora_version, run_fingerprint, tokenizer_identity
from parallel.layout import (
    MANIFEST_NAME,
    SHARD_SUFFIX,
    TOKEN_COLUMNS,
    TOKEN_DTYPE,
    Branch,
    ChatParallelRecord,
    ChatRecord,
    Message,
    PackedRow,
    Packer,
    PackerState,
    PackingOptions,
    PackItem,
    ParallelRecord,
    TextRecord,
    TokenSequence,
    branch_prompt_text,
)
from parallel.tokenizer import apply_template, chat_trunk, load_tokenizer, special_tokens
from pipeline.convert import (
    ConvertOptions,
    ConvertSummary,
    SourcedRecord,
    input_fingerprint_parts,
    iter_records,
)
from pipeline.readers import check_readable
from pipeline.shards import (
    JOURNAL_NAME,
    Manifest,
    ShardError,
    ShardFile,
    open_shards,
    read_manifest,
    write_manifest,
    write_shard,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "DEFAULT_ROWS_PER_SHARD",
    "RecordEncoder",
    "Rejected",
    "TokenizeJob",
    "TokenizeSummary",
    "pack_records",
    "tokenize_to_shards",
]

DEFAULT_ROWS_PER_SHARD = 2048
ENCODE_BATCH = 1000  # records per tokenizer call: large enough for the Rust batch mode to pay off
BATCHES_IN_FLIGHT_PER_WORKER = 2
# A text longer than LONG_TEXT characters is tokenized in pieces of about that size, cut where that
# gives the same tokens (RecordEncoder._cuts), so that memory follows the piece, not the record.
LONG_TEXT = 1 << 16
LONG_TEXT_PIECES_PER_CALL = 8  # pieces tokenized at once (the Rust batch mode's threads)
CUT_CONTEXT = 256  # characters each side of a cut checked to tokenize the same whole and cut
CUT_TRIES = 16  # candidate cuts checked before the rest of a text is tokenized whole
_CUT_CANDIDATE = re.compile(r"(?<=\S)(?= )|(?<=\n)(?=\S)")


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Records -> pack items
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejected:
    """A record the encoder could not tokenize. ``fatal`` stops the run even with --on-error skip
    (the tokenizer, not the record, is at fault)."""

    source: str
    line: int | None
    reason: str
    fatal: bool = False


class RecordEncoder:
    """Turns batches of records into pack items (see the module docstring for the token layout)."""

    def __init__(self, tokenizer: Any, options: PackingOptions):
        self.tokenizer = tokenizer
        self.options = options
        self.special = special_tokens(tokenizer)
        self._backend = tokenizer.backend_tokenizer
        # A tokenizer.json may carry truncation/padding settings; ids must never be cut or padded.
        self._backend.no_truncation()
        self._backend.no_padding()

    def _ids(self, texts: list[str]) -> list[np.ndarray]:
        return [ids for ids, _ in self._encode(texts, offsets=False)]

    def _encode(self, texts: list[str], *, offsets: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, character offsets ``[n, 2]``, empty unless asked for) of each text, in one batch
        call for the usual texts; long ones piece by piece (see :meth:`_cuts`)."""
        results: list[Any] = [None] * len(texts)
        short = [i for i, text in enumerate(texts) if len(text) <= LONG_TEXT]
        for i, encoded in zip(short, self._encode_batch([texts[i] for i in short], offsets), strict=True):
            results[i] = encoded
        for i, text in enumerate(texts):
            if results[i] is None:
                cuts = self._cuts(text)
                pieces = [text[a:b] for a, b in itertools.pairwise(cuts)]
                parts = [
                    part
                    for group in _batches(pieces, LONG_TEXT_PIECES_PER_CALL)
                    for part in self._encode_batch(group, offsets)
                ]
                starts = cuts[:-1]
                results[i] = (
                    np.concatenate([ids for ids, _ in parts]),
                    np.concatenate([spans + start for (_, spans), start in zip(parts, starts, strict=True)]),
                )
        return results

    def _encode_batch(self, texts: list[str], offsets: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        if not texts:
            return []
        # Without offsets the fast variant skips computing them.
        encode = self._backend.encode_batch if offsets else self._backend.encode_batch_fast
        no_offsets = np.zeros((0, 2), dtype=np.int64)
        return [
            (
                np.asarray(e.ids, dtype=TOKEN_DTYPE),
                np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) if offsets else no_offsets,
            )
            for e in encode(texts, add_special_tokens=False)
        ]

    def _cuts(self, text: str) -> list[int]:
        """Where to cut a long text (with 0 and its length) so that its pieces, tokenized apart, give
        its tokens. The tokenizer needs about a hundred bytes per character while it works, so a
        record of 50 MB tokenized whole needs 5 GB. A cut goes between a word and the space before
        the next (or after a newline), the last such place of each LONG_TEXT characters where the
        text around it (CUT_CONTEXT characters each side) tokenizes to the same tokens whole and in
        two parts; where no such place is found, the rest stays whole."""
        cuts = [0]
        while len(text) - cuts[-1] > LONG_TEXT:
            lo, hi = cuts[-1] + LONG_TEXT // 2, cuts[-1] + LONG_TEXT
            candidates = [m.start() for m in _CUT_CANDIDATE.finditer(text, lo, hi)][::-1]
            cut = next((p for p in candidates[:CUT_TRIES] if self._cut_is_safe(text, p)), None)
            if cut is None:
                break
            cuts.append(cut)
        return [*cuts, len(text)]

    def _cut_is_safe(self, text: str, at: int) -> bool:
        """Whether the text around ``at`` tokenizes the same whole and cut there."""
        a, b = at - CUT_CONTEXT, at + CUT_CONTEXT
        whole, left, right = self._backend.encode_batch_fast(
            [text[a:b], text[a:at], text[at:b]], add_special_tokens=False
        )
        return whole.ids == left.ids + right.ids

    def encode(self, batch: Sequence[SourcedRecord]) -> list[PackItem | Rejected]:
        """One result per record, in order."""
        texts: list[str] = []  # every plain string of the batch, tokenized in one call
        for item in batch:
            record = item.record
            if isinstance(record, TextRecord):
                texts.append(record.text)
            elif isinstance(record, ParallelRecord):
                texts.append(record.main)
                for branch in record.branches:
                    texts.extend((branch_prompt_text(branch.prompt), branch.response))
        ids = iter(self._ids(texts))
        chats = [(i, item) for i, item in enumerate(batch) if isinstance(item.record, ChatRecord)]
        chat_results = self._encode_chats(chats)
        eos = np.asarray([self.special.eos_id], dtype=TOKEN_DTYPE)
        results: list[PackItem | Rejected] = []
        for i, item in enumerate(batch):
            record = item.record
            if isinstance(record, TextRecord):
                text_ids = np.concatenate([next(ids), eos])
                results.append(PackItem((TokenSequence(text_ids, np.ones(len(text_ids), dtype=bool)),)))
            elif isinstance(record, ParallelRecord):
                trunk = TokenSequence.of(next(ids), self.options.train_trunk)
                branches = []
                for _ in record.branches:
                    prompt, response = next(ids), next(ids)
                    trained = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(response) + 1, bool)])
                    branches.append(TokenSequence.of(np.concatenate([prompt, response, eos]), trained))
                too_long = self._trunk_too_long(len(trunk))
                packed = PackItem(tuple(branches), trunk=trunk)
                results.append(Rejected(item.source, item.line, too_long) if too_long else packed)
            elif isinstance(record, ChatParallelRecord):
                results.append(self._encode_chat_parallel(item))
            else:
                results.append(chat_results[i])
        return results

    def _trunk_too_long(self, length: int, what: str = "'main'") -> str | None:
        """Why a trunk of ``length`` tokens cannot be packed, or None. Unlike a branch it cannot be
        split: every branch attends to the whole trunk, so a piece of it would change the record."""
        fits = self.options.max_seq_len - (1 if self.special.bos_id is not None else 0)
        if length <= fits:
            return None
        bos = " (one position is kept for BOS)" if self.special.bos_id is not None else ""
        return (
            f"trunk ({what}) longer than --max-seq-len: {length:,} tokens, at most {fits:,} fit{bos}; "
            "a trunk cannot be split like a branch, because every branch must see it whole: "
            f"shorten {what} or raise --max-seq-len"
        )

    def _encode_chats(self, chats: list[tuple[int, SourcedRecord]]) -> dict[int, PackItem | Rejected]:
        if not chats:
            return {}
        if self.tokenizer.chat_template is None:
            return dict.fromkeys((i for i, _ in chats), self._no_template(chats[0][1]))
        results: dict[int, PackItem | Rejected] = {}
        rendered: list[tuple[int, str, list[tuple[int, int]]]] = []
        for i, item in chats:
            try:
                text, spans = self._render(item.record)
            except _ContentNotRendered as err:
                return dict.fromkeys((j for j, _ in chats), self._not_rendered(item, err))
            except ValueError as err:
                results[i] = Rejected(item.source, item.line, str(err))
                continue
            rendered.append((i, text, spans))
        encodings = self._encode([text for _, text, _ in rendered], offsets=True)
        for (i, _, spans), encoded in zip(rendered, encodings, strict=True):
            results[i] = PackItem((self._trained_spans(*encoded, spans),))
        return results

    def _trained_spans(
        self, ids: np.ndarray, offsets: np.ndarray, spans: list[tuple[int, int]]
    ) -> TokenSequence:
        """The rendered chat's tokens, trained where they overlap a span; an EOS is appended (trained)
        when none of the trained tokens is one, so generation still learns to stop."""
        trained = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            trained |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
        if not np.any(ids[trained] == self.special.eos_id):
            ids = np.append(ids, TOKEN_DTYPE(self.special.eos_id))
            trained = np.append(trained, True)
        return TokenSequence(ids, trained)

    def _no_template(self, item: SourcedRecord) -> Rejected:
        where = f"{item.source}:{item.line}" if item.line is not None else item.source
        reason = (
            f"{where}: chat record, but the tokenizer {self.tokenizer.name_or_path} has no chat "
            "template; pass --chat-template FILE (a Jinja chat template)"
        )
        return Rejected(item.source, item.line, reason, fatal=True)

    def _not_rendered(self, item: SourcedRecord, err: _ContentNotRendered) -> Rejected:
        where = f"{item.source}:{item.line}" if item.line is not None else item.source
        reason = (
            f"{self.tokenizer.name_or_path}: the chat template does not render the assistant's "
            f"text (assistant message {err.index} of {where} is missing from its render), so only "
            "end-of-turn tokens would be trained; use a template that renders assistant content "
            "(--chat-template FILE)"
        )
        return Rejected(item.source, item.line, reason, fatal=True)

    def _encode_chat_parallel(self, item: SourcedRecord) -> PackItem | Rejected:
        """A chat parallel record: the trunk from :func:`chat_trunk`; each branch is what the
        template renders after the trunk when the branch's turns follow ``messages`` (a string:
        the assistant's answer; ``{prompt, response}``: a user turn and the assistant's answer),
        through the assistant's end of turn, of which the answer and its end of turn are trained.
        The trunk ends with the generation prompt unless a branch opens a user turn of its own."""
        record = item.record
        assert isinstance(record, ChatParallelRecord)
        if self.tokenizer.chat_template is None:
            return self._no_template(item)
        answers_only = not any(b.prompt for b in record.branches)
        try:
            messages, lead = record.messages, record.lead
            trunk_text = apply_template(self.tokenizer, messages, answers_only) + lead
            trunk = chat_trunk(self.tokenizer, messages, generation_prompt=answers_only, lead=lead)
            branches = [self._chat_branch(messages, b, trunk_text, lead) for b in record.branches]
        except _ContentNotRendered as err:
            return self._not_rendered(item, err)
        except ValueError as err:
            return Rejected(item.source, item.line, str(err))
        too_long = self._trunk_too_long(len(trunk), "the rendered 'messages'")
        if too_long:
            return Rejected(item.source, item.line, too_long)
        return PackItem(tuple(branches), trunk=trunk)

    def _chat_branch(
        self, messages: tuple[Message, ...], branch: Branch, trunk_text: str, lead: str
    ) -> TokenSequence:
        asked = (Message("user", branch.prompt),) if branch.prompt else ()
        turns = (*asked, Message("assistant", lead + branch.response))
        full, spans = self._render(ChatRecord(messages + turns))
        if not full.startswith(trunk_text):
            raise ValueError(
                "the chat template renders the conversation differently once a branch's turn follows it, "
                "so the branches cannot share one trunk"
            )
        start, end = spans[-1]  # the answer (lead and branch), through its end of turn
        cut = len(trunk_text)  # the lead is in the trunk
        [(ids, offsets)] = self._encode([full[cut:end]], offsets=True)
        return self._trained_spans(ids, offsets, [(start - cut, end - cut)])

    def _render(self, record: ChatRecord) -> tuple[str, list[tuple[int, int]]]:
        """The chat's full render and the character span of each assistant turn in it."""
        messages = [{"role": m.role, "content": m.content} for m in record.messages]
        full = apply_template(self.tokenizer, record.messages, False)
        befores, throughs = [], []
        for i, message in enumerate(record.messages):
            if message.role == "assistant":
                befores.append(apply_template(self.tokenizer, record.messages[:i], True))
                throughs.append(apply_template(self.tokenizer, record.messages[: i + 1], False).rstrip())
        prefix_stable = all(
            full.startswith(before) and full.startswith(through) and len(through) >= len(before)
            for before, through in zip(befores, throughs, strict=True)
        )
        if not prefix_stable:
            return full, self._search_spans(full, messages, throughs)
        assistants = [(i, m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"]
        spans = []
        for before, through, (index, content) in zip(befores, throughs, assistants, strict=True):
            # From the content on: what a template puts between the generation prompt and the
            # content (Qwen3's empty <think> block of a last turn) is not the assistant's text.
            at = full.find(content, len(before), len(through))
            if at < 0 and not any(word in full[len(before) : len(through)] for word in content.split()):
                raise _ContentNotRendered(index)  # not even reworded (trimmed, reasoning moved)
            spans.append((at if at >= 0 else len(before), len(through)))
        return full, spans

    def _search_spans(
        self, full: str, messages: list[dict[str, str]], throughs: list[str]
    ) -> list[tuple[int, int]]:
        """Assistant spans of a template that is not prefix-stable (Qwen3's drops the reasoning of
        earlier assistant turns): each content is searched for in the full render after the previous
        message's, and its span runs through the end-of-turn marker that follows it there, that
        marker being what the template puts right after the content when that turn is the last
        (or the EOS text)."""
        eos_text = self.tokenizer.eos_token or ""
        spans = []
        cursor = 0
        assistant = 0
        for i, message in enumerate(messages):
            content = message["content"]
            at = full.find(content, cursor)
            if message["role"] != "assistant":
                # Not trained: a template may rewrite or drop it, but where it is found it bounds the search.
                cursor = at + len(content) if at >= 0 else cursor
                continue
            through = throughs[assistant]
            assistant += 1
            if at < 0:
                raise ValueError(
                    f"the chat template is not prefix-stable and does not render assistant message {i}'s "
                    "content verbatim, so its tokens cannot be located; use --chat-template with a "
                    "template that renders earlier turns unchanged"
                )
            end = at + len(content)
            own = through.rfind(content)
            marker = through[own + len(content) :] if own >= 0 else ""
            for candidate in (marker, eos_text):
                if candidate and full.startswith(candidate, end):
                    end += len(candidate)
                    break
            spans.append((at, end))
            cursor = end
        return spans


class _ContentNotRendered(ValueError):
    """The chat template leaves an assistant message's text out of its render: a setup error of
    the template, not of one record."""

    def __init__(self, index: int):
        super().__init__(f"assistant message {index} is not rendered")
        self.index = index


def _raise_or_reject(result: Rejected, rejects: Rejects) -> None:
    if result.fatal:
        raise PloraError(result.reason)
    rejects.reject(result.source, result.line, result.reason)


def _batches(records: Iterable[SourcedRecord], size: int) -> Iterator[list[SourcedRecord]]:
    iterator = iter(records)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


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
        for batch in _batches(records, ENCODE_BATCH):
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
        for batch in _batches(records, ENCODE_BATCH):
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


# --------------------------------------------------------------------------------------
# Shard directory: fingerprint, journal, run
# --------------------------------------------------------------------------------------


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


@dataclass
class _Journal:
    """What an interrupted run leaves for --resume (see the module docstring)."""

    digest: str
    files: list[ShardFile]
    records_consumed: int
    packer: PackerState
    buffer: list[PackedRow]
    encode_rejects: list[list[Any]]  # [source, line, reason] of records the encoder rejected

    def to_bytes(self) -> bytes:
        header = {
            "digest": self.digest,
            "files": [f.to_json() for f in self.files],
            "records_consumed": self.records_consumed,
            "target": self.packer.target,
            "rng": self.packer.rng,
            "counts": self.packer.counts,
            "encode_rejects": self.encode_rejects,
            "buffer_meta": [[r.num_branches, r.trunk_len] for r in self.buffer],
        }
        pending = self.packer.pending
        arrays = {
            "header": np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8),
            "pending_lens": np.asarray([len(p) for p in pending], dtype=np.int64),
            "pending_ids": _concat([p.ids for p in pending], TOKEN_DTYPE),
            "pending_trained": _concat([p.trained for p in pending], bool),
            "buffer_lens": np.asarray([r.num_tokens for r in self.buffer], dtype=np.int64),
        }
        for name in TOKEN_COLUMNS:
            arrays[f"buffer_{name}"] = _concat([getattr(r, name) for r in self.buffer], TOKEN_DTYPE)
        sink = io.BytesIO()
        np.savez(sink, **arrays)
        return sink.getvalue()

    @staticmethod
    def from_file(path: Path) -> _Journal:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
            header = json.loads(arrays["header"].tobytes().decode("utf-8"))
        except Exception as err:  # noqa: BLE001 - any damage means the same: cannot resume
            raise PloraError(
                f"{path}: unreadable resume journal ({err}); use --overwrite to start over"
            ) from None
        cuts = np.cumsum(arrays["pending_lens"])[:-1]
        pending = (
            tuple(
                TokenSequence(ids, trained)
                for ids, trained in zip(
                    np.split(arrays["pending_ids"], cuts),
                    np.split(arrays["pending_trained"], cuts),
                    strict=True,
                )
            )
            if len(arrays["pending_lens"])
            else ()
        )
        buffer = []
        if len(arrays["buffer_lens"]):
            cuts = np.cumsum(arrays["buffer_lens"])[:-1]
            columns = [np.split(arrays[f"buffer_{name}"], cuts) for name in TOKEN_COLUMNS]
            for (ids, branch, time_, labels), (k, trunk) in zip(
                zip(*columns, strict=True), header["buffer_meta"], strict=True
            ):
                buffer.append(PackedRow(ids, branch, time_, labels, num_branches=k, trunk_len=trunk))
        return _Journal(
            digest=header["digest"],
            files=[ShardFile.from_json(f) for f in header["files"]],
            records_consumed=header["records_consumed"],
            packer=PackerState(
                pending=pending, target=header["target"], rng=header["rng"], counts=header.get("counts", {})
            ),
            buffer=buffer,
            encode_rejects=header["encode_rejects"],
        )


def _concat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)


def _own_files(directory: Path) -> list[Path]:
    """Files `plora tokenize` writes in a shard directory, manifest first (so that removing them
    in this order never leaves a sealed directory with missing shards)."""
    found: list[Path] = []
    for name in (MANIFEST_NAME, JOURNAL_NAME):
        found += [directory / name] if (directory / name).exists() else []
        found += atomic.temporaries(directory, name)
    shards = f"shard-*{SHARD_SUFFIX}"
    return found + sorted(directory.glob(shards)) + atomic.temporaries(directory, shards)


def _holds_only_own_files(directory: Path) -> bool:
    return set(directory.iterdir()) <= set(_own_files(directory))


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".plora-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PloraError(f"{out}: cannot write the shard directory: {err.strerror or err}") from None


def _changed_parts(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = ("inputs", "tokenizer", "options", "plora", "format")
    names = [key for key in keys if old.get(key) != new.get(key)]
    return ", ".join(names) or "digest"


def _interrupted(out: Path) -> PloraError:
    return PloraError(
        f"{out}: holds an interrupted run (incomplete: no {MANIFEST_NAME}); "
        "pass --resume to finish it or --overwrite to start over"
    )


def _start_state(job: TokenizeJob, fingerprint: dict[str, Any]) -> _Journal | Manifest | None:
    """Decide what to do with what is already in ``job.out``: the manifest of an up-to-date
    directory, a journal to resume from, or None (start afresh, after clearing old shards)."""
    out = job.out
    if job.resume and job.overwrite:
        raise PloraError("--resume and --overwrite contradict each other; pass one")
    manifest_path, journal_path = out / MANIFEST_NAME, out / JOURNAL_NAME
    if job.overwrite:
        for path in _own_files(out):
            path.unlink()
        return None
    if manifest_path.exists():
        manifest = read_manifest(out)
        old = manifest.fingerprint
        if old.get("digest") == fingerprint["digest"]:
            journal_path.unlink(missing_ok=True)  # a run killed between sealing and cleaning up
            return manifest
        raise PloraError(
            f"{out}: holds shards built from other {_changed_parts(old, fingerprint)}; "
            "pass --overwrite to replace them (or choose another --out)"
        )
    if journal_path.exists():
        journal = _Journal.from_file(journal_path)
        if not job.resume:
            raise _interrupted(out)
        if journal.digest != fingerprint["digest"]:
            raise PloraError(
                f"{out}: the interrupted run there was started with other inputs, tokenizer or options; "
                "pass --overwrite to start over"
            )
        for entry in journal.files:
            path = out / entry.name
            if not path.is_file() or file_sha256(path) != entry.sha256:
                raise ShardError(
                    f"{path}: missing or changed since it was written; pass --overwrite to start over"
                )
        done = {entry.name for entry in journal.files}
        for path in _own_files(out):  # a shard written after the last journal entry, and temporaries
            if path.name not in done and path.name != JOURNAL_NAME:
                path.unlink()
        return journal
    outdir.refuse_foreign(out, "--out", False, _holds_only_own_files, overwrite_does="write into it anyway")
    leftovers = _own_files(out)
    if leftovers and not job.resume:
        raise _interrupted(out)
    for path in leftovers:  # interrupted before its first journal: nothing to keep
        path.unlink()
    return None


def tokenize_to_shards(
    job: TokenizeJob, rejects: Rejects, *, progress: bool | None = None
) -> TokenizeSummary:
    """Run `plora tokenize` (see the module docstring). ``progress`` None: when stderr is a terminal."""
    started = time.monotonic()
    if job.rows_per_shard < 1:
        raise PloraError("--rows-per-shard must be at least 1")
    if job.num_proc < 1:
        raise PloraError("--num-proc must be at least 1")
    if not job.inputs and job.hf_dataset is None:
        raise PloraError("no input: give INPUT files")
    for path in job.inputs:  # fail before the tokenizer loads and before anything is created
        check_readable(Path(path))
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
    start = _start_state(job, fingerprint)
    summary = TokenizeSummary(out=job.out)
    if isinstance(start, Manifest):
        open_shards(job.out, verify=False)  # the files are there, whole-sized and of the right rows
        summary.up_to_date = True
        summary.rows, summary.tokens = start.num_rows, start.num_tokens
        return summary

    journal = start if isinstance(start, _Journal) else None
    files = list(journal.files) if journal else []
    consumed = journal.records_consumed if journal else 0
    packer = Packer(job.packing, encoder.special, state=journal.packer if journal else None)
    buffer: list[PackedRow] = list(journal.buffer) if journal else []
    encode_rejects: list[list[Any]] = list(journal.encode_rejects) if journal else []
    summary.resumed_from = len(files)
    for source, line, reason in encode_rejects:
        rejects.reject(source, line, reason)

    def save_journal() -> None:
        state = _Journal(fingerprint["digest"], files, consumed, packer.state(), buffer, encode_rejects)
        atomic.write_bytes(job.out / JOURNAL_NAME, state.to_bytes())

    def flush(final: bool) -> None:
        nonlocal buffer
        while len(buffer) >= job.rows_per_shard or (final and buffer):
            rows, buffer = buffer[: job.rows_per_shard], buffer[job.rows_per_shard :]
            files.append(write_shard(job.out, len(files), rows))
            if not final or buffer:
                save_journal()

    convert_summary = ConvertSummary()
    records = iter_records(job.inputs, job.convert, rejects, job.hf_dataset, summary=convert_summary)
    bar = _Progress(progress, job.inputs)
    records = itertools.islice(bar.tap(records), consumed, None)
    results = _encoded(
        records, encoder, num_proc=job.num_proc, tokenizer_path=job.tokenizer, chat_template=job.chat_template
    )
    tokens_this_run = 0
    rows_done = len(buffer) + sum(f.rows for f in files)
    with bar:
        for result in results:
            consumed += 1
            if isinstance(result, Rejected):
                _raise_or_reject(result, rejects)
                encode_rejects.append([result.source, result.line, result.reason])
                continue
            rows = packer.add(result)
            if rows:
                buffer.extend(rows)
                rows_done += len(rows)
                tokens_this_run += sum(r.num_tokens for r in rows)
                flush(final=False)
            bar.update(consumed, rows_done, tokens_this_run)
        rows = packer.finish()
        buffer.extend(rows)
        rows_done += len(rows)
        tokens_this_run += sum(r.num_tokens for r in rows)
        flush(final=True)
        bar.update(consumed, rows_done, tokens_this_run, final=True)
    if not files:
        raise PloraError("nothing to tokenize: the inputs hold no records (or every one was rejected)")

    manifest = Manifest(
        plora_version=plora_version(),
        tokenizer=identity,
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
    write_manifest(job.out, manifest)
    (job.out / JOURNAL_NAME).unlink(missing_ok=True)

    summary.records_in = convert_summary.records_in
    summary.records_rejected = rejects.total
    summary.records_out = consumed - len(encode_rejects)
    summary.rejected = dict(rejects.counts)
    summary.rows, summary.tokens, summary.trained = (
        manifest.num_rows,
        manifest.num_tokens,
        manifest.num_trained,
    )
    summary.shards = len(files)
    summary.tokens_this_run = tokens_this_run
    summary.notes = packing_notes(packer.counts, job.packing, convert_summary.dropped_branches)
    summary.seconds = time.monotonic() - started
    return summary


class _Progress:
    """A live line on stderr: records, rows, tokens, tokens/s, elapsed and, where the inputs are
    files, a bar and ETA by input bytes (a no-op when off)."""

    def __init__(self, enabled: bool | None, inputs: Sequence[Path]):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.meter = _InputMeter(inputs) if self.enabled else None
        self._progress: Any = None
        self._task: Any = None
        self._last = 0.0
        self._started = time.monotonic()

    def tap(self, records: Iterable[SourcedRecord]) -> Iterator[SourcedRecord]:
        """The records, noting how far through the inputs each one is."""
        if self.meter is None:
            yield from records
            return
        for item in records:
            self.meter.advance(item.source, item.line)
            yield item

    def __enter__(self) -> _Progress:
        if self.meter is not None:
            from rich.console import Console  # noqa: PLC0415
            from rich.progress import (  # noqa: PLC0415
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._progress.start()
            total = self.meter.total or None
            self._task = self._progress.add_task("tokenize", total=total, stats="")
        return self

    def update(self, records: int, rows: int, tokens: int, *, final: bool = False) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if now - self._last < 0.2 and not final:
            return
        self._last = now
        rate = tokens / max(now - self._started, 1e-9)
        stats = f"{records:,} records  {rows:,} rows  {tokens:,} tokens  {rate:,.0f} tok/s"
        self._progress.update(self._task, stats=stats, completed=self.meter.position if self.meter else 0)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


class _InputMeter:
    """How far reading has got through the input files, in bytes: the files before the current
    one plus its share, the record's line (or Parquet row) over the file's lines (rows), counted
    once when the file is reached. A gzipped file has no share until it is done."""

    def __init__(self, inputs: Sequence[Path]):
        self._files = [Path(p) for p in inputs if Path(p).is_file()]
        self._sizes = {str(p): p.stat().st_size for p in self._files}
        self._before: dict[str, int] = {}
        offset = 0
        for path in self._files:
            self._before.setdefault(str(path), offset)
            offset += self._sizes[str(path)]
        self.total = offset
        self._units: dict[str, int] = {}
        self.position = 0

    def advance(self, source: str, line: int | None) -> None:
        before = self._before.get(source)
        if before is None:
            return
        if source not in self._units:
            self._units[source] = _count_units(Path(source))
        units = self._units[source]
        share = min(line / units, 1.0) if units and line else 0.0
        self.position = before + int(self._sizes[source] * share)


def _count_units(path: Path) -> int:
    """Lines of a text file or rows of a Parquet file; 0 where unknown without decompressing."""
    if path.suffix == ".gz":
        return 0
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        return pq.ParquetFile(path).metadata.num_rows
    count = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            count += chunk.count(b"\n")
    return count
