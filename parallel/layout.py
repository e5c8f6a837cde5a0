"""The parallel layout contract: records, packing, coordinates, labels, masks and shards.

This is the single definition shared by the pipeline, the trainer, `plora inspect` and
parallel generation, written out in docs/layout.md. Everything else derives what it needs from here and never
re-implements it. The functions are pure: they take plain values or arrays and return new
ones.

Words used throughout:

- A *sequence* is one run of tokens that reads left to right: the trunk ("main") or one
  branch. A *row* holds ``[trunk?, b_1, ..., b_K]``; ``branch_id`` is the index in that list.
- Every token has a 2D coordinate ``(branch_id, time_id)``. The order of tokens inside a row
  carries no meaning; rows are stored branch-contiguous (sorted by branch, then time).
- Whether a row has a trunk is not stored: it follows from the coordinates (see
  :func:`row_has_trunk`), so that visibility depends on ``(branch_id, time_id)`` only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

# 2: every branch begins with its start token (branch_start); shards of version 1 have none.
FORMAT_VERSION = 2
IGNORE_INDEX = -100
TOKEN_DTYPE = np.int32

MaskMode = Literal["isolated", "columnar"]
Align = Literal["left", "right"]
MASK_MODES: tuple[str, ...] = ("isolated", "columnar")
ALIGN_MODES: tuple[str, ...] = ("left", "right")
ROLES: tuple[str, ...] = ("system", "user", "assistant")
# The keys of each kind of canonical record (docs/layout.md "Records"); a record has the keys of
# one kind only. "messages" and "branches" together make a chat parallel record (record_kinds).
RECORD_KEYS: dict[str, frozenset[str]] = {
    "text": frozenset({"text"}),
    "messages": frozenset({"messages"}),
    "parallel": frozenset({"main", "branches"}),
    "chat_parallel": frozenset({"messages", "branches"}),
}
# Keys a record of a kind may have besides its own (they do not decide the kind).
OPTIONAL_KEYS: dict[str, frozenset[str]] = {"chat_parallel": frozenset({"lead"})}

# Shard columns: per-token lists (equal length, in the row's stored order) ...
TOKEN_COLUMNS: tuple[str, ...] = ("input_ids", "branch_id", "time_id", "labels")
# ... and the row's packing metadata.
META_COLUMNS: tuple[str, ...] = ("num_branches", "trunk_len", "num_tokens", "num_trained")

# Original guide defaults.
DEFAULT_BRANCHES = 8
DEFAULT_MAX_SEQ_LEN = 512
DEFAULT_STRIDE = 128
DEFAULT_ROPE_2D_RATIO = 0.5


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


class RecordError(ValueError):
    """A record does not follow the contract. The message says what was expected."""


@dataclass(frozen=True)
class TextRecord:
    text: str


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ChatRecord:
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Branch:
    """A branch of a parallel record. ``prompt`` is context only; ``response`` is trained."""

    response: str
    prompt: str = ""


@dataclass(frozen=True)
class ParallelRecord:
    main: str
    branches: tuple[Branch, ...]


@dataclass(frozen=True)
class ChatParallelRecord:
    """A chat whose next assistant turn is written as parallel branches: the trunk is the chat
    template's render of ``messages`` (which never end with an assistant turn), followed by
    ``lead``, the start of the answer that every branch continues (a list's lead-in)."""

    messages: tuple[Message, ...]
    branches: tuple[Branch, ...]
    lead: str = ""


Record = TextRecord | ChatRecord | ParallelRecord | ChatParallelRecord


def _require_text(value: Any, what: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"{what} is empty")
    return value


def parse_record(obj: Any) -> Record:
    """Validate one canonical record (a decoded JSON object) and return it typed.

    Raises :class:`RecordError` naming what was expected.
    """
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    kinds = record_kinds(keys)
    one_of = "a record is one of {'text'}, {'messages'}, {'main', 'branches'}, {'messages', 'branches'}"
    if len(kinds) > 1:
        mixed = sorted(keys & frozenset().union(*(RECORD_KEYS[kind] for kind in kinds)))
        raise RecordError(f"keys {mixed} mix {' and '.join(kinds)} records; {one_of}")
    allowed = RECORD_KEYS[kinds[0]] | OPTIONAL_KEYS.get(kinds[0], frozenset()) if kinds else frozenset()
    unexpected = sorted(keys - allowed) if kinds else []
    if unexpected:
        raise RecordError(f"unexpected keys {unexpected}; {one_of}")
    kind = kinds[0] if kinds else None
    if kind == "chat_parallel":
        messages = _parse_messages(obj["messages"])
        if messages[-1].role == "assistant":
            raise RecordError(
                "chat parallel record: 'messages' end with an assistant turn, but the branches are "
                "that turn; end 'messages' with a user (or system) turn"
            )
        branches = _parse_branches(obj["branches"])
        lead = _require_text(obj.get("lead", ""), "'lead'", allow_empty=True)
        if lead and any(b.prompt for b in branches):
            raise RecordError(
                "chat parallel record: a 'lead' starts the assistant's answer, which every branch "
                "continues, so every branch must be a string (not a {prompt, response} turn)"
            )
        return ChatParallelRecord(messages=messages, branches=branches, lead=lead)
    if kind == "parallel":
        if "branches" not in keys:
            raise RecordError("parallel record has 'main' but no 'branches' list")
        main = _require_text(obj.get("main", ""), "'main'", allow_empty=True)
        return ParallelRecord(main=main, branches=_parse_branches(obj["branches"]))
    if kind == "messages":
        parsed = _parse_messages(obj["messages"])
        if not any(m.role == "assistant" for m in parsed):
            raise RecordError("chat has no assistant message, so nothing would be trained")
        return ChatRecord(messages=parsed)
    if kind == "text":
        return TextRecord(text=_require_text(obj["text"], "'text'"))
    raise RecordError(
        f"unknown record with keys {sorted(keys)}; expected 'text', 'messages', 'main' + 'branches' "
        "or 'messages' + 'branches'"
    )


def record_kinds(keys: Iterable[str]) -> list[str]:
    """The kinds of canonical record (keys of :data:`RECORD_KEYS`) whose keys are among ``keys``.

    'messages' and 'branches' together are a chat parallel record, not a chat mixed with a
    parallel record; either alone is a key of its own kind."""
    present = set(keys)
    together = RECORD_KEYS["chat_parallel"]
    kinds = ["chat_parallel"] if together <= present else []
    rest = present - together if kinds else present
    return kinds + [kind for kind, own in RECORD_KEYS.items() if kind != "chat_parallel" and own & rest]


def _parse_branches(branches: Any) -> tuple[Branch, ...]:
    if not isinstance(branches, list) or not branches:
        raise RecordError("'branches' must be a non-empty list")
    return tuple(_parse_branch(b, i) for i, b in enumerate(branches))


def _parse_messages(messages: Any) -> tuple[Message, ...]:
    if not isinstance(messages, list) or not messages:
        raise RecordError("'messages' must be a non-empty list")
    return tuple(_parse_message(m, i) for i, m in enumerate(messages))


def _parse_branch(value: Any, index: int) -> Branch:
    if isinstance(value, str):
        return Branch(response=_require_text(value, f"branch {index}"))
    if isinstance(value, dict) and set(value) <= {"prompt", "response"} and "response" in value:
        prompt = _require_text(value.get("prompt", ""), f"branch {index} 'prompt'", allow_empty=True)
        return Branch(response=_require_text(value["response"], f"branch {index} 'response'"), prompt=prompt)
    raise RecordError(f"branch {index} must be a string or {{'prompt': str, 'response': str}}")


def _parse_message(value: Any, index: int) -> Message:
    if not isinstance(value, dict) or "role" not in value or "content" not in value:
        raise RecordError(f"message {index} must be an object with 'role' and 'content'")
    role = value["role"]
    if role not in ROLES:
        raise RecordError(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
    return Message(role=role, content=_require_text(value["content"], f"message {index} 'content'"))


# Between a plain parallel branch's prompt and its response: a newline is a token boundary in
# every BPE pre-tokenizer, so the response tokenizes as it would at the start of a line, and the
# two read apart ("...four times?\nThe probability..." rather than "...times?The probability...").
PROMPT_SEPARATOR = "\n"


def branch_prompt_text(prompt: str) -> str:
    """The context text a plain parallel branch's response follows: its prompt and the separator,
    unless the prompt is empty or already ends with whitespace (a separator of its own)."""
    return prompt if not prompt or prompt[-1].isspace() else prompt + PROMPT_SEPARATOR


def record_to_json(record: Record) -> dict[str, Any]:
    """The canonical JSON object of a record (what `plora convert` writes)."""
    if isinstance(record, TextRecord):
        return {"text": record.text}
    messages = [{"role": m.role, "content": m.content} for m in getattr(record, "messages", ())]
    if isinstance(record, ChatRecord):
        return {"messages": messages}
    branches = [
        {"prompt": b.prompt, "response": b.response} if b.prompt else b.response for b in record.branches
    ]
    if isinstance(record, ChatParallelRecord):
        lead = {"lead": record.lead} if record.lead else {}
        return {"messages": messages, **lead, "branches": branches}
    return {"main": record.main, "branches": branches}


def record_to_line(record: Record) -> str:
    return json.dumps(record_to_json(record), ensure_ascii=False)


# --------------------------------------------------------------------------------------
# Token sequences and labels
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSequence:
    """One sequence's tokens. ``trained[j]`` says whether token j is a training target."""

    ids: np.ndarray
    trained: np.ndarray

    def __post_init__(self) -> None:
        if self.ids.shape != self.trained.shape or self.ids.ndim != 1:
            raise ValueError("ids and trained must be 1D arrays of the same length")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @staticmethod
    def of(ids: Sequence[int] | np.ndarray, trained: Sequence[bool] | np.ndarray | bool) -> TokenSequence:
        ids_arr = np.asarray(ids, dtype=TOKEN_DTYPE)
        if isinstance(trained, bool):
            trained_arr = np.full(ids_arr.shape, trained, dtype=bool)
        else:
            trained_arr = np.asarray(trained, dtype=bool)
        return TokenSequence(ids_arr, trained_arr)


def _labels(ids: np.ndarray, trained: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Labels of sequences laid end to end (``lens`` tokens each), in one pass: the label of token j
    is the id of token j+1 of the same sequence when that token is trained; a sequence's last token
    has none."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=TOKEN_DTYPE)
    if len(ids):
        labels[:-1] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
        labels[np.cumsum(lens)[lens > 0] - 1] = IGNORE_INDEX  # nothing is learnt across a sequence's end
    return labels


def split_sequence(seq: TokenSequence, max_len: int) -> list[TokenSequence]:
    """Split a sequence longer than ``max_len`` into consecutive pieces; no token is lost."""
    if max_len < 1:
        raise ValueError("max_len must be at least 1")
    if len(seq) <= max_len:
        return [seq]
    starts = range(0, len(seq), max_len)
    return [TokenSequence(seq.ids[i : i + max_len], seq.trained[i : i + max_len]) for i in starts]


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackingOptions:
    """How text/chat sequences are packed into rows. Every field is part of the shard fingerprint."""

    branches: int = DEFAULT_BRANCHES
    min_branches: int = 1
    max_branches: int = 0  # > 0 turns on dynamic mode: K ~ uniform[min_branches, max_branches]
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    align: Align = "left"
    seed: int = 0
    train_trunk: bool = True

    def __post_init__(self) -> None:
        if self.align not in ALIGN_MODES:
            raise ValueError(f"align must be one of {ALIGN_MODES}, got {self.align!r}")
        if self.max_seq_len < 2:
            raise ValueError("max_seq_len must be at least 2")
        if self.dynamic:
            if not 1 <= self.min_branches <= self.max_branches:
                raise ValueError(
                    f"need 1 <= min_branches <= max_branches, got {self.min_branches} and {self.max_branches}"
                )
        elif self.branches < 1:
            raise ValueError("branches must be at least 1")

    @property
    def dynamic(self) -> bool:
        return self.max_branches > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "branches": self.branches,
            "min_branches": self.min_branches,
            "max_branches": self.max_branches,
            "max_seq_len": self.max_seq_len,
            "align": self.align,
            "seed": self.seed,
            "train_trunk": self.train_trunk,
        }


@dataclass(frozen=True)
class SpecialTokens:
    eos_id: int
    bos_id: int | None = None  # set only when the tokenizer starts sequences with BOS


@dataclass(frozen=True)
class PackedRow:
    """One training sample, stored branch-contiguous."""

    input_ids: np.ndarray
    branch_id: np.ndarray
    time_id: np.ndarray
    labels: np.ndarray
    num_branches: int
    trunk_len: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_trained(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))


def branch_start_times(trunk_len: int, branch_lens: Sequence[int], align: Align) -> list[int]:
    """The time of each branch's first token (the contract's ``time_id`` rule)."""
    if align not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
    if align == "left" or not branch_lens:
        return [trunk_len] * len(branch_lens)
    longest = max(branch_lens)
    return [trunk_len + longest - n for n in branch_lens]


def branch_start(trunk: TokenSequence | None, special: SpecialTokens) -> tuple[TokenSequence | None, int]:
    """The trunk a row stores and the token every branch of the row starts with.

    A branch's first content token is predicted by its start, a token at the branch's own
    coordinate ``(branch_id, first column)``, so it has a label and the branch coordinate can
    decide it. The start reuses a token the model knows (LoRA trains no embeddings): the trunk's
    last token, moved out of the trunk into every branch (a chat trunk's is the end of the
    assistant prompt), so that with 2D RoPE off each branch reads exactly as its trunk followed by
    the branch; without a trunk, BOS where the tokenizer uses one, else EOS (what precedes a
    document in a stream of documents). A trunk of one token (BOS included) leaves no trunk; so
    with a BOS tokenizer a one-token trunk keeps ``[BOS]``.
    """
    bos = special.bos_id
    if trunk is not None and len(trunk) and bos is not None:
        trunk = _with_bos(trunk, bos)
    if trunk is None or len(trunk) == 0:
        return None, special.eos_id if bos is None else bos
    rest = TokenSequence(trunk.ids[:-1], trunk.trained[:-1])
    return (rest if len(rest) else None), int(trunk.ids[-1])


def build_row(
    trunk: TokenSequence | None, branches: Sequence[TokenSequence], align: Align, special: SpecialTokens
) -> PackedRow:
    """Lay out ``[trunk?, b_1..b_K]``: every branch begins with the row's start token
    (:func:`branch_start`), then coordinates and labels follow. An empty trunk counts as no trunk."""
    if not branches:
        raise ValueError("a row needs at least one branch")
    trunk, start = branch_start(trunk, special)
    # A chat template may render BOS itself: that BOS is then the branch's start.
    add = _with_bos if start == special.bos_id else _with_start
    branches = [add(b, start) for b in branches]
    trunk_len = 0 if trunk is None else len(trunk)
    starts = branch_start_times(trunk_len, [len(b) for b in branches], align)
    sequences = ([trunk] if trunk is not None else []) + list(branches)
    seq_starts = ([0] if trunk is not None else []) + starts
    # Whole-row array operations rather than per-sequence ones: rows often hold many short sequences.
    seq_lens = np.asarray([len(s) for s in sequences], dtype=np.int64)
    ids = np.concatenate([s.ids for s in sequences])
    labels = _labels(ids, np.concatenate([s.trained for s in sequences]), seq_lens)
    branch_id = np.repeat(np.arange(len(sequences), dtype=TOKEN_DTYPE), seq_lens)
    shift = np.asarray(seq_starts) - (np.cumsum(seq_lens) - seq_lens)  # time minus index of each first token
    time_id = (np.arange(len(ids)) + np.repeat(shift, seq_lens)).astype(TOKEN_DTYPE)
    return PackedRow(ids, branch_id, time_id, labels, num_branches=len(branches), trunk_len=trunk_len)


def _with_start(seq: TokenSequence, start: int) -> TokenSequence:
    ids = np.concatenate([[start], seq.ids]).astype(TOKEN_DTYPE)
    return TokenSequence(ids, np.concatenate([[False], seq.trained]))


def _with_bos(seq: TokenSequence, bos_id: int) -> TokenSequence:
    return seq if len(seq) and seq.ids[0] == bos_id else _with_start(seq, bos_id)


@dataclass
class BranchCounter:
    """Draws K (branches per row) for text/chat rows: fixed, or uniform in [min, max] from a seeded RNG."""

    options: PackingOptions
    _rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.options.seed)

    def next(self) -> int:
        o = self.options
        if not o.dynamic:
            return o.branches
        return int(self._rng.integers(o.min_branches, o.max_branches + 1))

    @property
    def rng_state(self) -> dict[str, Any]:
        """The RNG's state (plain JSON values), so an interrupted packing can continue exactly."""
        return dict(self._rng.bit_generator.state)

    @rng_state.setter
    def rng_state(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state


@dataclass(frozen=True)
class PackItem:
    """What the packer consumes: one tokenized record.

    ``pieces`` are the text/chat sequence (already ending in EOS); for a parallel record,
    ``trunk`` is set (possibly empty) and ``pieces`` are its branches.
    """

    pieces: tuple[TokenSequence, ...]
    trunk: TokenSequence | None = None

    @property
    def is_parallel(self) -> bool:
        return self.trunk is not None


PACKER_COUNTS: tuple[str, ...] = ("branches_split", "split_pieces", "rows_above_k", "wide_split", "wide_rows")


@dataclass(frozen=True)
class PackerState:
    """Everything a :class:`Packer` carries between items: the pieces waiting for a row, the
    size of that row and the RNG that draws the next sizes."""

    pending: tuple[TokenSequence, ...]
    target: int
    rng: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)  # Packer.counts so far


def piece_len(options: PackingOptions) -> int:
    """The longest piece of text a branch may hold: ``max_seq_len``, less the branch's start token."""
    return options.max_seq_len - 1


class Packer:
    """Packs tokenized records into rows per the contract, one item at a time.

    Text/chat sequences are split to ``max_seq_len`` and packed K to a row in input order; the
    last partial row is kept (:meth:`finish`). A parallel record becomes a row of its own,
    emitted when it is read; its long branches are split too. In dynamic mode a parallel record
    with more branches than ``max_branches`` becomes several rows of at most that many, each
    with the same trunk, trained in the first only so that every token is trained once; in
    fixed mode it stays whole (a row above K). The trunk must fit ``max_seq_len`` (the encoder
    rejects longer ones). Each branch's start token is reserved inside ``max_seq_len`` so no
    branch exceeds it. :attr:`counts` says how often each of these happened.
    :meth:`state` snapshots the packer between items and ``Packer(..., state=...)`` restores it,
    so an interrupted run can resume exactly.
    """

    def __init__(self, options: PackingOptions, special: SpecialTokens, state: PackerState | None = None):
        self.options = options
        self.special = special
        self._piece_len = piece_len(options)
        self._counter = BranchCounter(options)
        self._pending: list[TokenSequence] = []
        self._target = self._counter.next()
        # branches_split: sequences longer than max_seq_len, split into split_pieces pieces;
        # rows_above_k: fixed-mode parallel rows wider than K; wide_split: dynamic-mode parallel
        # records wider than max_branches, made into wide_rows rows.
        self.counts: dict[str, int] = dict.fromkeys(PACKER_COUNTS, 0)
        if state is not None:
            self._pending = list(state.pending)
            self._target = state.target
            self._counter.rng_state = state.rng
            self.counts.update(state.counts)

    def _split(self, sequences: Sequence[TokenSequence]) -> list[TokenSequence]:
        pieces = []
        for seq in sequences:
            split = split_sequence(seq, self._piece_len)
            if len(split) > 1:
                self.counts["branches_split"] += 1
                self.counts["split_pieces"] += len(split)
            pieces += split
        return pieces

    def _parallel_rows(self, trunk: TokenSequence, pieces: list[TokenSequence]) -> list[PackedRow]:
        o = self.options
        width = o.max_branches if o.dynamic else len(pieces)
        if not o.dynamic and len(pieces) > o.branches:
            self.counts["rows_above_k"] += 1
        chunks = [pieces[i : i + width] for i in range(0, len(pieces), width)]
        if len(chunks) > 1:
            self.counts["wide_split"] += 1
            self.counts["wide_rows"] += len(chunks)
        untrained = TokenSequence(trunk.ids, np.zeros(len(trunk), dtype=bool))
        return [
            build_row(trunk if i == 0 else untrained, chunk, o.align, self.special)
            for i, chunk in enumerate(chunks)
        ]

    def add(self, item: PackItem) -> list[PackedRow]:
        """Take one record; return the rows it completes (often none)."""
        o = self.options
        pieces = self._split(item.pieces)
        if item.is_parallel:
            return self._parallel_rows(item.trunk, pieces)  # type: ignore[arg-type]  # set when parallel
        rows = []
        for piece in pieces:
            self._pending.append(piece)
            if len(self._pending) == self._target:
                rows.append(build_row(None, self._pending, o.align, self.special))
                self._pending = []
                self._target = self._counter.next()
        return rows

    def finish(self) -> list[PackedRow]:
        """The last, partial row (kept, never dropped), if any pieces are waiting."""
        if not self._pending:
            return []
        row = build_row(None, self._pending, self.options.align, self.special)
        self._pending = []
        return [row]

    def state(self) -> PackerState:
        pending = tuple(self._pending)
        return PackerState(pending, self._target, self._counter.rng_state, counts=dict(self.counts))


# --------------------------------------------------------------------------------------
# RoPE coordinates
# --------------------------------------------------------------------------------------


def rope_positions(branch_id: Any, time_id: Any, stride: int = DEFAULT_STRIDE) -> tuple[Any, Any]:
    """(branch position, time position) of each token; works on numpy arrays and torch tensors."""
    return branch_id * stride, time_id


def branch_pair_indices(num_pairs: int, ratio: float, pair_indices: Sequence[int] | None = None) -> list[int]:
    """1-based indices of the rotary frequency pairs that rotate by the branch position.

    ``round(ratio * num_pairs)`` pairs; by default the last ones (lowest frequencies).
    Explicit ``pair_indices`` override ``ratio``.
    """
    if pair_indices is not None:
        chosen = sorted(set(int(i) for i in pair_indices))
        if chosen and (chosen[0] < 1 or chosen[-1] > num_pairs):
            raise ValueError(f"pair_indices must lie in 1..{num_pairs}, got {list(pair_indices)}")
        return chosen
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"rope_2d_ratio must lie in [0, 1], got {ratio}")
    count = round(ratio * num_pairs)
    return list(range(num_pairs - count + 1, num_pairs + 1))


# --------------------------------------------------------------------------------------
# Attention visibility
# --------------------------------------------------------------------------------------


def row_has_trunk(branch_id: Any, time_id: Any, valid: Any) -> Any:
    """Whether each row (last axis = tokens) has a trunk, from coordinates alone.

    Branch 0 is a trunk iff it ends before every other sequence starts: a trunk occupies
    times ``0..M-1`` and every branch starts at ``M`` or later, while in a row without a trunk
    the branches start together (left align) or end together (right align). A row holding a
    single sequence gets True, which is harmless: there is no other branch to see it.
    Works on numpy arrays and torch tensors alike.
    """
    xp = _namespace(time_id)
    big = np.iinfo(np.int32).max
    is_first = (branch_id == 0) & valid
    first_end = xp.amax(xp.where(is_first, time_id, -1), -1)
    others_start = xp.amin(xp.where(valid & (branch_id > 0), time_id, big), -1)
    return first_end < others_start


def visible(
    mode: str, q_branch: Any, q_time: Any, k_branch: Any, k_time: Any, same_token: Any, has_trunk: Any
) -> Any:
    """The contract's visibility of key k to query q, elementwise over broadcastable arrays.

    isolated: ``time(k) <= time(q)`` and (k in q's branch, or k in the trunk).
    columnar: ``time(k) < time(q)`` or k is q.
    Padding is handled by the caller (it neither sees nor is seen).
    """
    if mode == "isolated":
        return (k_time <= q_time) & ((k_branch == q_branch) | ((k_branch == 0) & has_trunk))
    if mode == "columnar":
        return (k_time < q_time) | same_token
    raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")


def _namespace(array: Any) -> Any:
    if isinstance(array, np.ndarray):
        return np
    import torch  # noqa: PLC0415 - torch only when torch tensors are passed

    return torch


# --------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------

MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".arrow"
