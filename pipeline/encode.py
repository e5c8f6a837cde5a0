"""Records -> pack items: the tokens each canonical record becomes (`plora tokenize`'s encoding).

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
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from parallel.layout import (
    TOKEN_DTYPE,
    Branch,
    ChatParallelRecord,
    ChatRecord,
    Message,
    PackingOptions,
    PackItem,
    ParallelRecord,
    TextRecord,
    TokenSequence,
    branch_prompt_text,
)
from parallel.tokenizer import apply_template, chat_trunk, special_tokens
from pipeline.convert import SourcedRecord

__all__ = ["RecordEncoder", "Rejected", "batches"]

# A text longer than LONG_TEXT characters is tokenized in pieces of about that size, cut where that
# gives the same tokens (RecordEncoder._cuts), so that memory follows the piece, not the record.
LONG_TEXT = 1 << 16
LONG_TEXT_PIECES_PER_CALL = 8  # pieces tokenized at once (the Rust batch mode's threads)
CUT_CONTEXT = 256  # characters each side of a cut checked to tokenize the same whole and cut
CUT_TRIES = 16  # candidate cuts checked before the rest of a text is tokenized whole
_CUT_CANDIDATE = re.compile(r"(?<=\S)(?= )|(?<=\n)(?=\S)")


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
                    for group in batches(pieces, LONG_TEXT_PIECES_PER_CALL)
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
            assert isinstance(item.record, ChatRecord)  # encode() passes the chats only
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


T = TypeVar("T")


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
