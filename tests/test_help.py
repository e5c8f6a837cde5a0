"""`plora COMMAND --help` is readable in an 80-column terminal (issue 10, item 21): every option by its
full plora name, no type shown for on/off flags, and the original guide's underscore spellings listed
once at the end instead of crowding (and cutting short) the option names; those spellings still work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
from cli_helpers import one_line_error, run_cli

import cli.main  # noqa: F401 - registers every command on the app
from cli.app import app

COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


def _help(command: str) -> str:
    done = run_cli(command, "--help", env={"COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def _words(text: str) -> str:
    """The text without the panels' borders and line breaks."""
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_item21_help_names_every_option_in_full_without_bool_metavars(command: str) -> None:
    text = _help(command)
    options_panel, _, epilog = text.rpartition("╰")
    assert "<bool>" not in text
    assert "…" not in options_panel
    params = [p for p in COMMANDS[command].params if not p.hidden and p.param_type_name == "option"]
    for param in params:
        names = [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
        plora_names = [o for o in names if "_" not in o]
        aliases = [o for o in names if "_" in o]
        for name in plora_names:
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", options_panel), (command, name)
        for alias in aliases:
            assert alias not in options_panel and alias in _words(epilog), (command, alias)


def test_item21_eval_rope_flags_have_help() -> None:
    text = _words(_help("eval"))
    assert "share of frequency pairs for branches" in text
    assert "branch position = branch_id * stride" in text


def test_item21_hidden_aliases_still_work(sample_dir: Path, tiny_model_dir: Path) -> None:
    records = sample_dir / "sample_text.txt"
    done = run_cli("inspect", records, "--tokenizer", tiny_model_dir, "--max_seq_len", "0")
    assert "bad packing options" in one_line_error(done)  # the alias was parsed as --max-seq-len
