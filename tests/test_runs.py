"""Issue 10 item 18: `plora runs OUT_DIR` lists a run's checkpoints with their losses, draws the curves, and
each run logs into its own TensorBoard directory."""

from __future__ import annotations

import json
from pathlib import Path

from cli_helpers import one_line_error, run_cli
from train_helpers import cli_args

from trainer.checkpoint import final_checkpoint, step_checkpoint
from trainer.metrics import logs_dir, read_metrics

NAME = "hf_parallel_lora"


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
