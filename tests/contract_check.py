"""An independent checker of shard contents against the contract (docs/layout.md), for the tests.

It reads rows the way any consumer would (columns and packing metadata) and checks them against
the source records and the tokenizer, re-deriving what every token must be from the contract's
words alone. It deliberately imports nothing of parallel.layout's packing, coordinate or label
code and nothing of pipeline.tokenize, so a bug there cannot hide itself here.

Records are canonical JSON objects (dicts), in input order. Checked, for every row:

- the four token columns have equal length; the metadata matches the columns;
- each sequence (trunk or branch) has consecutive times; a trunk occupies times 0..M-1 and
  every branch starts at M or later (left align: at M; right align: the branches end together);
  no branch is longer than max_seq_len; text/chat rows hold K branches (the last may hold fewer);
- every branch begins with the row's start token: the last token of the record's trunk (ids(main)
  or the chat trunk, after a BOS where the tokenizer uses one), which the stored trunk then lacks;
  without a trunk, BOS where the tokenizer uses one, else EOS;
- every label is -100 or the next token of the same sequence; the last token has none;
- the tokens after the starts are exactly the records' tokens, in order, nothing lost or added:
  text = ids(text) + [eos]; chat = ids(rendered chat) (+ eos if the render has none); parallel =
  ids(main) as trunk, ids(prompt + separator) + ids(response) + [eos] per branch; chat parallel =
  ids(render(messages) + generation prompt) as trunk, per branch what the template renders after
  it for the branch's turns, through the assistant's end of turn (+ eos if none);
- which tokens are trained, every content token of every branch included (its first one is
  predicted by the start): all of a text, response + eos of a branch, the trunk iff train_trunk
  (a chat parallel record's never), for chats the tokens of each assistant content and its
  end-of-turn token and nothing else;
- detokenizing each record's tokens gives back its source text (whitespace aside).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

IGNORE = -100


@dataclass
class Piece:
    """One sequence of one row, sorted by time."""

    ids: np.ndarray
    labels: np.ndarray
    start: int
    row: int


@dataclass
class Expected:
    """What a record must become: its ids and, per id, whether it is trained."""

    ids: list[int]
    trained: list[bool]
    text: str  # what decoding ids must give back (whitespace aside)


def _squash(text: str) -> str:
    return "".join(text.split())


class Checker:
    def __init__(self, tokenizer: Any, packing: dict[str, Any]):
        self.tok = tokenizer
        self.packing = packing
        self.eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        self.bos = bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None
        self.trained_tokens = 0

    # -- tokens of records, from the contract's words (docs/layout.md) --------------------------

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def expect_text(self, text: str) -> Expected:
        ids = self.ids(text) + [self.eos]
        return Expected(ids, [True] * len(ids), text + self.tok.decode([self.eos]))

    def expect_branch(self, branch: str | dict[str, str]) -> Expected:
        prompt, response = ("", branch) if isinstance(branch, str) else (branch["prompt"], branch["response"])
        if prompt and not prompt[-1].isspace():
            prompt += "\n"  # the contract's separator between a prompt and its response
        p, r = self.ids(prompt), self.ids(response) + [self.eos]
        return Expected(
            p + r, [False] * len(p) + [True] * len(r), prompt + response + self.tok.decode([self.eos])
        )

    def trunk_and_start(self, trunk_ids: list[int]) -> tuple[list[int], int]:
        """The trunk a row stores for a record's trunk ids, and its branches' start token."""
        ids = list(trunk_ids)
        if self.bos is not None and ids and ids[0] != self.bos:
            ids = [self.bos, *ids]
        if not ids:
            return [], self.eos if self.bos is None else self.bos
        return ids[:-1], ids[-1]

    def chat_trunk_text(self, record: dict[str, Any]) -> str:
        answers_only = all(isinstance(b, str) for b in record["branches"])
        return self.tok.apply_chat_template(
            record["messages"], tokenize=False, add_generation_prompt=answers_only
        )

    def expect_chat_branch(self, record: dict[str, Any], branch: str | dict[str, str]) -> Expected:
        """What the template renders after the record's trunk for the branch's turns, cut after the
        assistant's end of turn; the answer and that end of turn trained."""
        prompt, response = ("", branch) if isinstance(branch, str) else (branch["prompt"], branch["response"])
        turns = ([{"role": "user", "content": prompt}] if prompt else []) + [
            {"role": "assistant", "content": response}
        ]
        full = self.tok.apply_chat_template(record["messages"] + turns, tokenize=False)
        trunk = self.chat_trunk_text(record)
        assert full.startswith(trunk), "the chat template does not extend the trunk"
        text = full[len(trunk) :].rstrip()
        return self.expect_chat(turns, rendered=text)

    def expect_chat(self, messages: list[dict[str, str]], rendered: str | None = None) -> Expected:
        """A chat's render (or ``rendered``, a render of ``messages`` that may start mid-chat)."""
        if rendered is None:
            rendered = self.tok.apply_chat_template(messages, tokenize=False)
        enc = self.tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        special = set(self.tok.all_special_ids)
        trained = [False] * len(ids)
        cursor = 0
        for message in messages:
            at = rendered.find(message["content"], cursor)
            assert at >= 0, f"content of a {message['role']} message missing from the render"
            end = at + len(message["content"])
            cursor = end
            if message["role"] != "assistant":
                continue
            for j, (s, e) in enumerate(offsets):
                if e > at and s < end:
                    trained[j] = True
            # ... through its end-of-turn token: the first special token after it, whitespace between
            after = [j for j, (s, _) in enumerate(offsets) if s >= end]
            for j in after:
                if ids[j] in special:
                    trained[j] = True
                    break
                assert not rendered[offsets[j][0] : offsets[j][1]].strip(), (
                    "text between content and turn end"
                )
        text = rendered
        if self.eos not in [t for t, on in zip(ids, trained, strict=True) if on]:
            ids, trained, text = ids + [self.eos], trained + [True], text + self.tok.decode([self.eos])
        if self.bos is not None and ids[:1] == [self.bos]:
            ids, trained = ids[1:], trained[1:]  # a BOS the template renders is the branch's start
        return Expected(ids, trained, text)

    # -- rows ----------------------------------------------------------------------------------

    def pieces(self, row: Any, index: int) -> tuple[Piece | None, list[Piece]]:
        """Check one row's structure; return its trunk (if any) and branches, each sorted by time."""
        n = len(row.input_ids)
        assert len(row.branch_id) == len(row.time_id) == len(row.labels) == n, f"row {index}: column lengths"
        assert row.num_tokens == n, f"row {index}: num_tokens"
        assert row.num_trained == int(np.count_nonzero(row.labels != IGNORE)), f"row {index}: num_trained"
        seqs = []
        branch_ids = sorted(set(row.branch_id.tolist()))
        assert branch_ids == list(range(len(branch_ids))), f"row {index}: branch ids not 0..n-1"
        for b in branch_ids:
            sel = np.flatnonzero(row.branch_id == b)
            order = sel[np.argsort(row.time_id[sel], kind="stable")]
            times = row.time_id[order]
            assert np.all(np.diff(times) == 1), f"row {index} sequence {b}: times not consecutive"
            ids, labels = row.input_ids[order], row.labels[order]
            ok = (labels[:-1] == IGNORE) | (labels[:-1] == ids[1:])
            assert ok.all(), f"row {index} sequence {b}: a label is not the next token"
            assert labels[-1] == IGNORE, f"row {index} sequence {b}: the last token has a label"
            seqs.append(Piece(ids, labels, int(times[0]), index))
        m = row.trunk_len
        trunk = None
        if m > 0:
            trunk, seqs = seqs[0], seqs[1:]
            assert trunk.start == 0 and len(trunk.ids) == m, f"row {index}: trunk is not times 0..{m - 1}"
        assert row.num_branches == len(seqs), f"row {index}: num_branches"
        starts = [s.start for s in seqs]
        ends = [s.start + len(s.ids) for s in seqs]
        assert min(starts) >= m, f"row {index}: a branch starts before the trunk ends"
        if self.packing["align"] == "left":
            assert set(starts) == {m}, f"row {index}: left-aligned branches do not all start at {m}"
        else:
            assert len(set(ends)) == 1, f"row {index}: right-aligned branches do not end together"
            assert min(starts) == m, f"row {index}: right-aligned longest branch does not start at {m}"
        assert max(len(s.ids) for s in seqs) <= self.packing["max_seq_len"], f"row {index}: branch too long"
        return trunk, seqs

    # -- matching tokens to records --------------------------------------------------------------

    def real_ids(self, piece: Piece) -> list[int]:
        """The piece's ids after its start token."""
        return [int(t) for t in piece.ids[1:]]

    def check_starts(self, pieces: list[Piece], start: int, where: str) -> None:
        for piece in pieces:
            assert int(piece.ids[0]) == start, (
                f"{where}: branch starts with {self.tok.decode([int(piece.ids[0])])!r}, "
                f"not the start token {self.tok.decode([start])!r}"
            )

    def match(self, pieces: list[Piece], expected: list[Expected], what: str) -> None:
        """The pieces, in order, hold exactly the expected records' tokens; each record starts a piece."""
        stream = [(p, k) for p in pieces for k in range(1, len(p.ids))]
        firsts = {(id(p), 1) for p in pieces}
        pos = 0
        for number, exp in enumerate(expected):
            where = f"{what} record {number}"
            exp_ids, exp_trained = exp.ids, exp.trained
            assert pos < len(stream), f"{where}: its tokens are missing (text lost)"
            piece, k = stream[pos]
            assert (id(piece), k) in firsts, f"{where}: does not start a new sequence (row {piece.row})"
            got = stream[pos : pos + len(exp_ids)]
            got_ids = [int(p.ids[k]) for p, k in got]
            assert got_ids == exp_ids, (
                f"{where}: tokens differ (row {piece.row}):\n got {self.tok.decode(got_ids)!r}\n"
                f" want {self.tok.decode(exp_ids)!r}"
            )
            decoded = self.tok.decode(got_ids)
            assert _squash(decoded) == _squash(exp.text), f"{where}: decodes to {decoded!r}, not {exp.text!r}"
            for (p, k), trained in zip(got, exp_trained, strict=True):
                # k >= 1: every content token, a branch's first included, has its start before it
                target = p.labels[k - 1] != IGNORE
                assert target == trained, (
                    f"{where}: token {self.tok.decode([int(p.ids[k])])!r} (row {p.row}) should "
                    f"{'' if trained else 'not '}be trained"
                )
                self.trained_tokens += int(target)
            pos += len(exp_ids)
        assert pos == len(stream), f"{what}: {len(stream) - pos} tokens belong to no record"


def _is_parallel(record: dict[str, Any]) -> bool:
    return "branches" in record


def check_rows(
    rows: list[Any], records: list[dict[str, Any]], tokenizer: Any, packing: dict[str, Any]
) -> int:
    """Assert the contract over all rows (in shard order) built from ``records``; return the
    number of trained tokens seen, which must equal the rows' ``num_trained`` sum."""
    checker = Checker(tokenizer, packing)
    parallel = [r for r in records if _is_parallel(r)]
    serial = [r for r in records if not _is_parallel(r)]
    expected_parallel = []
    for r in parallel:
        if "messages" in r:
            text = checker.chat_trunk_text(r)
            branches = [checker.expect_chat_branch(r, b) for b in r["branches"]]
        else:
            text, branches = r["main"], [checker.expect_branch(b) for b in r["branches"]]
        expected_parallel.append((text, checker.ids(text), branches, "messages" in r))
    text_pieces: list[Piece] = []
    text_rows: list[int] = []
    next_parallel = 0
    # A parallel record wider than a dynamic max_branches spans several rows, each with its trunk.
    spanning: list[tuple[int, Piece | None]] = []
    spanning_branches: list[Piece] = []
    for index, row in enumerate(rows):
        trunk, branches = checker.pieces(row, index)
        if next_parallel < len(parallel):
            main, main_ids, exp, chat = expected_parallel[next_parallel]
            stored_trunk, _ = checker.trunk_and_start(main_ids)
            branch_ids = [t for p in branches for t in checker.real_ids(p)]
            wanted = [t for e in exp for t in e.ids]
            untrunked = not stored_trunk and wanted[: len(branch_ids)] == branch_ids
            if spanning or trunk is not None or untrunked:
                assert trunk is not None or not stored_trunk, f"row {index}: parallel row lost its trunk"
                widest = packing["max_branches"] or row.num_branches
                assert row.num_branches <= widest, f"row {index}: wider than max_branches"
                spanning.append((index, trunk))
                spanning_branches.extend(branches)
                if sum(len(checker.real_ids(p)) for p in spanning_branches) < len(wanted):
                    continue
                trunk_trained = packing["train_trunk"] and not chat  # a chat trunk never is
                _check_parallel(checker, spanning, spanning_branches, (main, main_ids), exp, trunk_trained)
                spanning, spanning_branches = [], []
                next_parallel += 1
                continue
        text_pieces.extend(branches)
        text_rows.append(index)
    assert next_parallel == len(parallel), f"{len(parallel) - next_parallel} parallel records have no row"
    k_fixed = packing["max_branches"] == 0
    for n, index in enumerate(text_rows):
        k = rows[index].num_branches
        if n == len(text_rows) - 1:
            ok = k <= (packing["branches"] if k_fixed else packing["max_branches"])
        else:
            ok = (
                k == packing["branches"]
                if k_fixed
                else packing["min_branches"] <= k <= packing["max_branches"]
            )
        assert ok, f"row {index}: {k} branches breaks the packing options {packing}"
    expected = [
        checker.expect_text(r["text"]) if "text" in r else checker.expect_chat(r["messages"]) for r in serial
    ]
    checker.check_starts(text_pieces, checker.trunk_and_start([])[1], "text/chat rows")
    checker.match(text_pieces, expected, "text/chat")
    assert checker.trained_tokens == sum(int(r.num_trained) for r in rows), "trained tokens unaccounted for"
    return checker.trained_tokens


def _check_parallel(
    checker: Checker,
    trunks: list[tuple[int, Piece | None]],
    branches: list[Piece],
    main: tuple[str, list[int]],
    expected: list[Expected],
    train_trunk: bool,
) -> None:
    """One parallel record's rows (one, or several when it is wider than max_branches): each row
    has the record's trunk less its last token, which starts every branch; the trunk is trained
    (iff train_trunk) in the first row only."""
    text, ids = main
    stored, start = checker.trunk_and_start(ids)
    assert _squash(checker.tok.decode(ids)) == _squash(text), "trunk does not decode to its text"
    for n, (index, trunk) in enumerate(trunks):
        if not stored:
            assert trunk is None, f"row {index}: a trunk where the record's trunk is the branches' start"
            continue
        assert trunk is not None and [int(t) for t in trunk.ids] == stored, (
            f"row {index}: trunk tokens are not the record's trunk less its last token"
        )
        targets = trunk.labels[:-1] != IGNORE
        trained = train_trunk and n == 0
        ok = targets.all() if trained else not targets.any()
        assert ok, f"row {index}: trunk training does not follow train_trunk={train_trunk} ({n})"
        checker.trained_tokens += int(targets.sum())
    checker.check_starts(branches, start, f"row {trunks[0][0]} parallel")
    checker.match(branches, expected, f"row {trunks[0][0]} parallel")
