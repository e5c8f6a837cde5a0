"""Issue 10, training side: a run's length, resuming a finished run, and resuming when there is nothing."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_cli
from train_helpers import REPO_ROOT, cli_args

from pipeline.shards import open_shards
from pipeline.tinymodel import ensure_tiny_model
from trainer.checkpoint import final_checkpoint, step_checkpoint
from trainer.metrics import logs_dir, read_metrics

NAME = "hf_parallel_lora"


def _train(shards: Path, model: Path, out: Path, *extra: str):
    done = run_cli(*cli_args(shards, model, out, *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _summary_losses(stderr: str) -> tuple[float, float]:
    found = re.search(r"loss (\S+) -> (\S+?)[,;]", " ".join(stderr.split()))
    assert found, stderr
    return float(found.group(1)), float(found.group(2))


def test_item23_max_steps_is_the_length_of_the_run(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    per_epoch = -(-open_shards(train_shards).manifest.num_rows // 4)
    steps = per_epoch + 2  # more than the default --epochs 1 makes
    done = _train(train_shards, tiny_model_dir, tmp_path / "out",
                  "--batch-size", "4", "--max-steps", str(steps), "--log-interval", "1")  # fmt: skip
    meta = json.loads((final_checkpoint(tmp_path / "out", NAME) / "plora.json").read_text())
    assert meta["step"] == steps
    records = read_metrics(logs_dir(tmp_path / "out", NAME) / "metrics.jsonl")
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == list(range(1, steps + 1))
    epochs = f"{steps / per_epoch:.2f}".rstrip("0").rstrip(".")
    assert f"trained {steps} steps ({epochs} epochs)" in " ".join(done.stderr.split())


def test_item9_resume_covers_the_whole_run_and_a_finished_run_is_left_alone(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    flags = ["--batch-size", "4", "--max-steps", "4", "--save-interval", "2", "--log-interval", "1",
             "--lr", "1e-2"]  # fmt: skip
    out = tmp_path / "out"
    whole = _train(train_shards, tiny_model_dir, tmp_path / "whole", *flags)
    _train(train_shards, tiny_model_dir, out, *flags)
    # Cut the run back to its step-2 checkpoint, as a run killed after it would have left it.
    final = final_checkpoint(out, NAME)
    for path in sorted(final.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    final.rmdir()
    resumed = _train(train_shards, tiny_model_dir, out, *flags, "--resume", "latest")
    assert "resuming at step 2" in " ".join(resumed.stderr.split())
    first, last = _summary_losses(resumed.stderr)
    assert (first, last) == _summary_losses(whole.stderr)  # the whole run's first loss, not step 3's
    assert math.isfinite(first) and first != last

    # Resuming the finished run: one line, exit 0, nothing rewritten.
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    again = _train(train_shards, tiny_model_dir, out, *flags, "--resume", "latest")
    line = " ".join(again.stderr.split())
    assert "nothing to do: the run already finished at step 4" in line and str(final) in line
    assert "nan" not in again.stderr and "tokens/s" not in again.stderr
    assert again.stderr.count("\n") == 1
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert step_checkpoint(out, NAME, 2).is_dir()


def test_item15_resume_latest_with_nothing_to_resume_says_so(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = _train(train_shards, tiny_model_dir, out, "--max-steps", "1", "--resume", "latest")
    line = " ".join(done.stderr.split())
    assert "--resume latest: no checkpoint of hf_parallel_lora in" in line
    assert "nothing to resume, starting a fresh run" in line
    assert final_checkpoint(out, NAME).is_dir()


def test_item4_eval_and_load_lora_refuse_an_adapter_of_another_base(
    train_shards: Path, one_step_adapter: Path, tmp_path: Path
) -> None:
    adapter = one_step_adapter  # trained on the tiny qwen2 model
    llama = ensure_tiny_model(arch="llama")  # the same tokenizer, another architecture
    expected = f"model_type is 'llama', but the adapter {adapter} was trained on a base with 'qwen2'"
    evaluate = ["eval", "--shards", train_shards, "--base-model", llama, "--adapter", adapter]
    evaluated = run_cli(*evaluate)
    assert expected in one_line_error(evaluated)
    continued = run_cli(*cli_args(train_shards, llama, tmp_path / "llama", "--max-steps", "1",
                                  "--load-lora", str(adapter)))  # fmt: skip
    assert expected in one_line_error(continued)
    assert not final_checkpoint(tmp_path / "llama", NAME).exists()


def test_item17_eval_split_val_is_the_runs_held_out_rows_and_max_rows_caps(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    _train(train_shards, tiny_model_dir, out, "--max-steps", "2", "--val-fraction", "0.2")
    adapter = final_checkpoint(out, NAME)
    logged = [r["val_loss"] for r in read_metrics(logs_dir(out, NAME) / "metrics.jsonl") if "val_loss" in r]
    base = ["eval", "--shards", train_shards, "--base-model", tiny_model_dir, "--no-progress"]

    def evaluate(*extra: object) -> dict:
        done = run_cli(*base, "--adapter", adapter, "--json", *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    rows = open_shards(train_shards).manifest.num_rows
    val = evaluate("--split", "val")
    assert val["rows"] == round(0.2 * rows) and val["loss"] == pytest.approx(logged[-1], rel=1e-6)
    assert evaluate("--split", "train")["rows"] == rows - val["rows"]
    assert evaluate("--split", "val", "--max-rows", "3")["rows"] == 3
    no_adapter = run_cli(*base, "--split", "val")
    assert "--split val needs --adapter" in one_line_error(no_adapter)


def test_item20_demo_echoes_commands_that_paste_back_and_resumes_its_training() -> None:
    script = (REPO_ROOT / "scripts" / "demo.sh").read_text()
    common = (REPO_ROOT / "scripts" / "demo_common.sh").read_text()  # the demos' shared `run`
    run_definition = next(line for line in common.splitlines() if line.startswith("run()"))
    command = ["printf", "%s|", 'Four ways to spend a rainy afternoon: it\'s "wet"', "$HOME"]
    shown = subprocess.run(["bash", "-c", f'{run_definition}\nrun "$@"', "demo", *command],
                           capture_output=True, text=True, check=True)  # fmt: skip
    echoed = shown.stderr.splitlines()[0]
    assert echoed.startswith("$ ")
    pasted = subprocess.run(["bash", "-c", echoed[2:]], capture_output=True, text=True, check=True)
    assert pasted.stdout == shown.stdout == "|".join(command[2:]) + "|"
    # A re-run of the demo resumes its finished training run (a no-op, see item 9) instead of retraining.
    train = script[script.index('"$PLORA" train') :].split("\n\n")[0]
    assert "--resume latest" in train
