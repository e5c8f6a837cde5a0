"""Live progress on stderr, one line per job: convert, tokenize, train and eval (rich underneath).

A line draws nothing until it is started or first shows progress (an update with ``completed``),
so that an error raised before any work stays one line on stderr. Updates reach the screen at
most every ``REFRESH`` seconds; the latest one is kept and drawn on stop. Disabled, every call is
a no-op.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["InputMeter", "ProgressLine"]

REFRESH = 0.2  # seconds between two updates drawn; keeps a per-record update's cost negligible


class ProgressLine:
    """``label``, a bar with its ETA (``bar``), ``done/total`` (``count``), a caller's stats text and
    the time elapsed. ``enabled`` None: when stderr is a terminal. ``transient``: erased on stop."""

    def __init__(
        self,
        label: str,
        *,
        enabled: bool | None,
        total: float | None = None,
        completed: float = 0,
        bar: bool = True,
        count: bool = False,
        transient: bool = False,
        console: Console | None = None,
    ) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.console = console if console is not None else Console(stderr=True)
        self.started = time.monotonic()
        self._last = 0.0
        self._pending: dict[str, Any] = {}
        self._progress: Progress | None = None
        if not self.enabled:
            return
        columns: list[str | ProgressColumn] = [SpinnerColumn(), TextColumn(f"[bold]{label}")]
        columns += [BarColumn()] if bar else []
        columns += [MofNCompleteColumn()] if count else []
        columns += [TextColumn("{task.fields[stats]}"), TimeElapsedColumn()]
        columns += [TimeRemainingColumn()] if bar else []
        self._progress = Progress(*columns, console=self.console, transient=transient)
        self._task = self._progress.add_task(label, total=total, completed=completed, stats="")  # type: ignore[arg-type]  # rich annotates int, stores any number

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    def start(self) -> None:
        if self._progress is not None and not self._progress.live.is_started:
            self._progress.start()

    def due(self) -> bool:
        """Whether an update now would be drawn (a caller can skip building its stats otherwise)."""
        return self._progress is not None and time.monotonic() - self._last >= REFRESH

    def update(
        self, completed: float | None = None, *, total: float | None = None, stats: str | None = None
    ) -> None:
        """Set what is done (and the total, or the stats text, where given); drawn when due."""
        if self._progress is None:
            return
        given = {"completed": completed, "total": total, "stats": stats}
        self._pending.update({k: v for k, v in given.items() if v is not None})
        if completed is None and not self._progress.live.is_started:
            return  # a total or stats alone do not start the line
        if self.due():
            self._draw()

    def advance(self, amount: float) -> None:
        if self._progress is not None:
            done = self._pending.get("completed", self._progress.tasks[0].completed)
            self.update(done + amount)

    def _draw(self) -> None:
        assert self._progress is not None
        self.start()
        self._progress.update(self._task, **self._pending)
        self._pending = {}
        self._last = time.monotonic()

    def stop(self) -> None:
        """Draw the latest update and end the line (a line never started prints nothing)."""
        if self._progress is None:
            return
        if self._progress.live.is_started:
            if self._pending:
                self._draw()
            self._progress.stop()

    def __enter__(self) -> ProgressLine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Sourced(Protocol):
    @property
    def source(self) -> str: ...
    @property
    def line(self) -> int | None: ...


_Record = TypeVar("_Record", bound=_Sourced)


class InputMeter:
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

    def tap(self, records: Iterable[_Record]) -> Iterator[_Record]:
        """The records, noting how far through the inputs each one is."""
        for item in records:
            self.advance(item.source, item.line)
            yield item

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
