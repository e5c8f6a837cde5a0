"""pipeline.progress: the one live progress line of convert, tokenize, train and eval."""

from __future__ import annotations

import io

from rich.console import Console

from pipeline.progress import ProgressLine


def console() -> Console:
    return Console(file=io.StringIO(), width=200, force_terminal=False)


def test_stop_draws_the_latest_update_even_when_it_came_too_soon_to_draw() -> None:
    out = console()
    line = ProgressLine("train", enabled=True, total=10, count=True, console=out)
    line.update(1, stats="loss 9.0")
    line.update(7, stats="loss 2.5")  # within REFRESH of the first: kept, not drawn yet
    line.stop()
    text = out.file.getvalue()
    assert "7/10" in text and "loss 2.5" in text and "loss 9.0" not in text


def test_a_line_without_progress_prints_nothing() -> None:
    out = console()
    line = ProgressLine("eval", enabled=True, count=True, console=out)
    line.update(total=5)  # the rows are known before the model loads, which may still fail
    line.stop()
    assert out.file.getvalue() == ""


def test_advance_counts_on_from_the_pending_update() -> None:
    out = console()
    line = ProgressLine("eval", enabled=True, count=True, console=out)
    line.update(total=6)
    for _ in range(3):
        line.advance(2)
    line.stop()
    assert "6/6" in out.file.getvalue()


def test_disabled_or_not_a_terminal_prints_nothing() -> None:
    out = console()
    for line in (ProgressLine("convert", enabled=False, console=out), ProgressLine("convert", enabled=None)):
        with line:
            line.update(5, stats="5 records")
        assert not line.enabled  # None: stderr, captured by pytest here, is not a terminal
    assert out.file.getvalue() == ""
