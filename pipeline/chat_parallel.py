"""The chat parallel record that `plora convert --split-lists` and `--group-by` write.

Shape (one JSON object per line)::

    {"messages": [{"role", "content"}, ...], "lead": str?, "branches": [str | {"prompt", "response"}, ...]}

The trunk is the chat template's render of ``messages`` with the generation prompt, followed by
``lead``: the start of the assistant's answer that every branch continues (a list's lead-in,
"Here are five tips:\\n"). ``lead`` is written only when it is not empty. A string branch is
an assistant continuation of the trunk; a ``{prompt, response}`` branch is a user turn and the
assistant's answer to it. For a split list, ``lead + "".join(branches)`` is the original answer.

:func:`chat_parallel_record` is the one place that builds (and checks) this shape, so that the
validator of the canonical record kind can share it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from parallel.layout import ROLES, RecordError


def chat_parallel_record(
    messages: Sequence[dict[str, str]], branches: Sequence[str | dict[str, str]], lead: str = ""
) -> dict[str, Any]:
    """The JSON object of a chat parallel record; RecordError says what was expected."""
    if not messages:
        raise RecordError("'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        _check_message(message, index)
    if messages[-1]["role"] == "assistant":
        raise RecordError(
            "'messages' end with an assistant turn; expected the trunk to end before the answer"
        )
    if not isinstance(lead, str):
        raise RecordError(f"'lead' must be a string, got {type(lead).__name__}")
    if not branches:
        raise RecordError("'branches' must be a non-empty list")
    for index, branch in enumerate(branches):
        _check_branch(branch, index)
    record: dict[str, Any] = {"messages": [dict(m) for m in messages]}
    if lead:
        record["lead"] = lead
    record["branches"] = [b if isinstance(b, str) else dict(b) for b in branches]
    return record


def _check_message(message: Any, index: int) -> None:
    if not isinstance(message, dict) or set(message) != {"role", "content"}:
        raise RecordError(f"message {index} must be an object with 'role' and 'content'")
    if message["role"] not in ROLES:
        raise RecordError(f"message {index} has role {message['role']!r}; expected one of {', '.join(ROLES)}")
    _check_text(message["content"], f"message {index} 'content'")


def _check_branch(branch: Any, index: int) -> None:
    if isinstance(branch, str):
        _check_text(branch, f"branch {index}")
        return
    if not isinstance(branch, dict) or not set(branch) <= {"prompt", "response"} or "response" not in branch:
        raise RecordError(f"branch {index} must be a string or {{'prompt': str, 'response': str}}")
    _check_text(branch["response"], f"branch {index} 'response'")
    if not isinstance(branch.get("prompt", ""), str):
        raise RecordError(f"branch {index} 'prompt' must be a string")


def _check_text(value: Any, what: str) -> None:
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"{what} is empty")


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
