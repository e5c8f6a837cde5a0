"""Issue 10 item 18: `plora runs OUT_DIR` lists a run's checkpoints with their losses, draws the curves, and
each run logs into its own TensorBoard directory."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_cli
from train_helpers import cli_args
from typer.testing import CliRunner

from cli.main import app
from parallel.atomic import write_json
from parallel.errors import PloraError
from trainer.checkpoint import (
    STATE_DIR,
    STATE_FILE,
    RunIdentity,
    TrainerState,
    final_checkpoint,
    step_checkpoint,
)
from trainer.metrics import logs_dir, read_metrics
from trainer.runs import find_runs

NAME = "hf_parallel_lora"
# What a trainer state holds after its run identity, in the order plora has always written it.
FIELDS_AFTER_IDENTITY = [
    "first_loss",
    "last_loss",
    "run_id",
    "step",
    "epoch",
    "step_in_epoch",
    "world_size",
    "tokens_seen",
    "scaler",
    "config",
    "format",
    "param_groups",
]


def test_item18_runs_lists_checkpoints_with_losses_and_draws_curves(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    flags = ["--max-steps", "4", "--save-interval", "2", "--val-fraction", "0.2", "--log-interval", "1"]
    trained = run_cli(*cli_args(train_shards, tiny_model_dir, out, *flags))
    assert trained.returncode == 0, trained.stderr[-3000:]
    records = read_metrics(logs_dir(out, NAME) / "metrics.jsonl")
    loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}

    png = tmp_path / "curves.png"
    done = run_cli("runs", out, "--png", png)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = f"run {NAME}: step 4/4, logged loss {loss[1]:.4f} -> {loss[4]:.4f}, best validation"
    assert lines[0].startswith(header)
    for checkpoint, step in ((step_checkpoint(out, NAME, 2), 2), (final_checkpoint(out, NAME), 4)):
        row = next(line.split() for line in lines if line.split()[:1] == [checkpoint.name])
        assert row[1:4] == [str(step), f"{loss[step]:.4f}", f"{val[step]:.4f}"]
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # This run's TensorBoard events are in a directory of its own, named by the id its checkpoints record.
    run_id = json.loads((final_checkpoint(out, NAME) / "trainer_state" / "state.json").read_text())["run_id"]
    boards = list((logs_dir(out, NAME) / "tensorboard").iterdir())
    assert [p.name for p in boards] == [run_id] and any(boards[0].glob("events.out.tfevents.*"))


def test_item18_runs_of_a_directory_without_runs_is_one_line(tmp_path: Path) -> None:
    assert "no training runs here" in one_line_error(run_cli("runs", tmp_path))


def _checkpoint(out: Path, step: int) -> Path:
    """A published step checkpoint as far as `plora runs` reads it: its trainer state."""
    identity = RunIdentity(
        seed=1, group_by_length=False, val_fraction=0.0, global_batch=4, shards_digest="d", total_steps=8
    )
    state = TrainerState(identity, 2.5, 2.0, "run", step, 0, step, 1, 100, {}, {})
    path = step_checkpoint(out, NAME, step)
    (path / STATE_DIR).mkdir(parents=True)
    write_json(path / STATE_DIR / STATE_FILE, state.to_json())
    return path


def test_runs_reports_an_unreadable_checkpoint_and_lists_the_others(tmp_path: Path) -> None:
    good = _checkpoint(tmp_path, 2)
    bad = _checkpoint(tmp_path, 4)
    (bad / STATE_DIR / STATE_FILE).write_text("{not json")
    [run] = find_runs(tmp_path)
    assert [c.path for c in run.checkpoints] == [good] and run.total_steps == 8
    assert [u.path for u in run.unreadable] == [bad] and "not valid JSON" in run.unreadable[0].reason

    done = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert done.exit_code == 0, done.output
    rows = {line.split()[0]: line for line in done.output.splitlines()[2:]}
    assert rows[good.name].split()[1] == "2"
    assert rows[bad.name].split()[1] == "unreadable:" and str(bad / STATE_DIR / STATE_FILE) in rows[bad.name]


def test_trainer_state_reads_back_what_it_wrote_and_names_a_bad_key(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, 2)
    state = TrainerState.read(path)
    assert state.step == 2 and state.identity.total_steps == 8 and state.first_loss == 2.5
    file = path / STATE_DIR / STATE_FILE
    obj = json.loads(file.read_text())
    assert list(obj) == [*dataclasses.asdict(state.identity), *FIELDS_AFTER_IDENTITY]
    file.write_text(json.dumps({**obj, "step": "2"}))
    with pytest.raises(PloraError, match=rf'^{re.escape(str(file))}: step is "2", expected an integer$'):
        TrainerState.read(path)
