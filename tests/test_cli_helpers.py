"""run_cli stands in for a `plora` process: same output and status, and nothing of the run left behind."""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli, run_plora

import cli.main


def test_in_process_run_gives_what_the_process_gives(plora_bin: Path, tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    for args in (["convert", "a.jsonl", "--out", "out.jsonl"], ["convert", "a.jsonl", "--frmat", "x"]):
        inside, outside = run_cli(*args, cwd=tmp_path), run_plora(plora_bin, *args, cwd=tmp_path)
        assert (inside.returncode, inside.stdout, inside.stderr) == (
            outside.returncode,
            outside.stdout,
            outside.stderr,
        )


def test_a_run_leaves_this_process_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.utils import logging as hf_logging

    library_log = hf_logging.get_logger("transformers.plora_test")  # its stderr handler, as at import

    def command(**_: object) -> int:
        os.environ["PLORA_TEST_LEAK"] = "1"
        os.chdir(tmp_path)
        torch.set_num_threads(3)
        warnings.simplefilter("error")
        library_log.warning("a library's log line")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli.main, "app", command)
    before = (os.getcwd(), dict(os.environ), torch.get_num_threads(), list(warnings.filters))
    handlers = {s: signal.getsignal(s) for s in cli.main.STOP_SIGNALS}
    done = run_cli("anything")
    assert done.returncode == 1 and "UserWarning: a library's warning" in done.stderr  # filter "error"
    assert "a library's log line" in done.stderr  # a handler made at import writes to the run's stderr
    assert (os.getcwd(), dict(os.environ), torch.get_num_threads(), list(warnings.filters)) == before
    assert {s: signal.getsignal(s) for s in cli.main.STOP_SIGNALS} == handlers
