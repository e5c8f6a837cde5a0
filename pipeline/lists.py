"""`plora convert --split-lists`: an assistant answer that is a list becomes a chat parallel record.

The answer is the last turn of the normalised chat (whatever format it came in), so Alpaca,
ShareGPT, messages and prompt/response records all split the same way. The list is the first run
of lines that start with a marker: ``1.`` / ``1)`` numbered from 1 and counting up, or one bullet
(``-``, ``*``, ``+``, ``•``) at one indentation. An item runs from its marker line to the next
item's; blank lines and indented lines (continuations, nested lists) stay inside it. The first
line after the list that is neither ends it.

The record is cut at the first marker, keeping every character:

- ``lead``: the text before the list (the answer's lead-in), which the trunk ends with;
- one branch per item, marker included, with the whitespace that follows it (so branch k of a
  numbered list starts with "k." and generated branches read as a list when joined);
- ``lead + "".join(branches)`` is the original answer.

Text after the list ("These tips will help you...") depends on the items, so it cannot be written
in parallel with them; such an answer is kept whole, as an ordinary chat, and counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from parallel.layout import ChatParallelRecord, ChatRecord, ParallelRecord, Record, RecordError, TextRecord
from pipeline.chat_parallel import chat_parallel_record

DEFAULT_MIN_ITEMS = 3
MARKER = re.compile(r"(?P<indent>[ \t]*)(?:(?P<number>\d{1,3})(?P<delim>[.)])|(?P<bullet>[-*+•]))[ \t]+\S")

# Why an answer was kept whole (summary counts).
NO_LIST = "no list"
TEXT_AFTER = "text after the list"
NOT_LAST = "not ending with an assistant turn"
NO_CONTEXT = "no turn before the answer"
ALREADY_PARALLEL = "already parallel"


def fewer_than(min_items: int) -> str:
    return f"fewer than {min_items} items"


@dataclass(frozen=True)
class ListSplit:
    lead: str
    items: list[str]


def split_answer(answer: str, min_items: int = DEFAULT_MIN_ITEMS) -> ListSplit | str:
    """The lead-in and items of a list answer, or why it is not one (a reason for the summary)."""
    lines = answer.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if _starts_list(line)), None)
    if first is None:
        return NO_LIST
    marker = MARKER.match(lines[first])
    assert marker is not None  # _starts_list matched it
    starts, end = [first], first + 1
    for i in range(first + 1, len(lines)):
        line = lines[i]
        if _next_item(line, marker, len(starts)):
            starts.append(i)
            end = i + 1
        elif line[0] in " \t" and line.strip():  # a continuation or a nested list
            end = i + 1
        elif line.strip():
            break
    if len(starts) < min_items:
        return fewer_than(min_items)
    tail = "".join(lines[end:])
    if tail.strip():
        return TEXT_AFTER
    bounds = [*starts, end]
    items = ["".join(lines[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    items[-1] += tail  # trailing whitespace stays with the last item
    return ListSplit("".join(lines[:first]), items)


def _starts_list(line: str) -> bool:
    marker = MARKER.match(line)
    return marker is not None and marker["number"] in (None, "1")


def _next_item(line: str, first: re.Match[str], count: int) -> bool:
    """Whether ``line`` starts item ``count + 1`` of the list that ``first`` began."""
    marker = MARKER.match(line)
    if marker is None or marker["indent"] != first["indent"]:
        return False
    if first["bullet"] is not None:
        return marker["bullet"] == first["bullet"]
    return marker["delim"] == first["delim"] and marker["number"] == str(count + 1)


def split_record(record: Record, min_items: int = DEFAULT_MIN_ITEMS) -> dict | str:
    """The chat parallel record of a chat whose last answer is a list, or why the record stays as
    it is. RecordError for a record without assistant turns (nothing to split)."""
    if isinstance(record, TextRecord):
        raise RecordError("no assistant turn: --split-lists splits the assistant's answer of a chat record")
    if isinstance(record, ParallelRecord | ChatParallelRecord):
        return ALREADY_PARALLEL
    assert isinstance(record, ChatRecord)
    *context, answer = record.messages
    if answer.role != "assistant":
        return NOT_LAST
    if not context:
        return NO_CONTEXT
    split = split_answer(answer.content, min_items)
    if isinstance(split, str):
        return split
    messages = [{"role": m.role, "content": m.content} for m in context]
    return chat_parallel_record(messages, split.items, split.lead)
