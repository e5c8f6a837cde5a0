"""Bad input: one clear line naming file and line, or a counted reject."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

OnError = Literal["raise", "skip"]


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (libraries raise pages), or its type's name."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class PloraError(Exception):
    """An error the CLI reports as one line (no traceback) and exits non-zero."""


def missing_extra(what: str, extra: str) -> PloraError:
    """The error for an optional dependency that is not installed, naming the extra that brings it."""
    return PloraError(f"{what} needs the '{extra}' extra: pip install 'plora[{extra}]'")


class Stopped(Exception):
    """Work stopped on SIGINT or SIGTERM after saving what it had: the CLI prints ``plora: interrupted
    <message>`` (or ``terminated``) and exits with the shell's status for that signal (130, 143)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class InputError(PloraError):
    """Bad input at a known place: ``FILE:LINE: message``, and ``FILE:LINE: item [I] of the array:
    message`` for an element of a JSON array (many of which can share a line)."""

    def __init__(self, source: str, line: int | None, message: str, index: int | None = None) -> None:
        self.source = source
        self.line = line
        self.message = message
        where = f"{source}:{line}" if line is not None else source
        item = f"item [{index}] of the array: " if index is not None else ""
        super().__init__(f"{where}: {item}{message}")


@dataclass
class Rejects:
    """Where bad records go. ``raise`` stops at the first one; ``skip`` writes each to a
    JSONL rejects file (source, line, reason, raw text) and counts reasons."""

    on_error: OnError = "raise"
    path: Path | None = None
    counts: Counter[str] = field(default_factory=Counter)
    _file: TextIO | None = None

    def reject(
        self, source: str, line: int | None, reason: str, raw: Any = None, index: int | None = None
    ) -> None:
        if self.on_error == "raise":
            raise InputError(source, line, reason, index)
        self.counts[_reason_kind(reason)] += 1
        if self.path is not None:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            entry = {"source": source, "line": line, "reason": reason, "raw": raw}
            if index is not None:
                entry["index"] = index
            # default=str: table rows may carry dates, decimals or bytes.
            self._file.write(json.dumps(entry, ensure_ascii=False, default=_text) + "\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary: the message up to its first detail."""
    return reason.split(";")[0].split(":")[0].strip()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
