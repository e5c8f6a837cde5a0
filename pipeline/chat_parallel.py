"""The chat parallel record that `plora convert --split-lists` and `--group-by` write.

Shape (one JSON object per line)::

    {"messages": [{"role", "content"}, ...], "lead": str?, "branches": [str | {"prompt", "response"}, ...]}

The trunk is the chat template's render of ``messages`` with the generation prompt, followed by
``lead``: the start of the assistant's answer that every branch continues (a list's lead-in,
"Here are five tips:\\n"). ``lead`` is written only when it is not empty. A string branch is
an assistant continuation of the trunk; a ``{prompt, response}`` branch is a user turn and the
assistant's answer to it. For a split list, ``lead + "".join(branches)`` is the original answer.

:func:`chat_parallel_record` is the one place that builds this shape; the contract's validator
checks it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from parallel.layout import parse_record


def chat_parallel_record(
    messages: Sequence[dict[str, str]], branches: Sequence[str | dict[str, str]], lead: str = ""
) -> dict[str, Any]:
    """The JSON object of a chat parallel record, checked by the contract's one validator
    (:func:`parallel.layout.parse_record`); RecordError says what was expected."""
    record: dict[str, Any] = {"messages": [dict(m) for m in messages]}
    if lead:
        record["lead"] = lead
    record["branches"] = [b if isinstance(b, str) else dict(b) for b in branches]
    parse_record(record)
    return record


@dataclass
class ParallelCounts:
    """What a converter to parallel records did: records in, parallel records out (and their
    branches), and the records kept as they were, by reason."""

    option: str  # the flag, as the summary names it
    records_in: int = 0
    parallel_out: int = 0
    branches: int = 0
    kept: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        kept = sum(self.kept.values())
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in self.kept.most_common())
        return (
            f"  {self.option}: {self.records_in:,} records in, {self.parallel_out:,} parallel records out "
            f"({self.branches:,} branches), {kept:,} kept as they were" + (f" ({reasons})" if reasons else "")
        )
