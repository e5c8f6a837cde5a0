"""`plora train`'s --out-dir (issue 10 items 2, 11, 16): runs never mix, a second writer stops at once,
a full disk while saving a checkpoint is one line, and --save-total-limit rotates step checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_cli
from outdir_helpers import held_lock, run_on_small_disk, tree
from train_helpers import cli_args

NAME = "hf_parallel_lora"


def train_run(
    shards: Path, model: Path, out: Path, *extra: object, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    args = cli_args(shards, model, out, "--batch-size", "4", "--log-interval", "1", *map(str, extra))
    return run_cli(*args, cwd=cwd)


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "lora").iterdir())


def step_of(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state" / "state.json").read_text())["step"]


def test_item2_new_run_into_a_used_out_dir_refuses_and_overwrite_starts_clean(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = train_run(train_shards, tiny_model_dir, out, "--max-steps", 3, "--save-interval", 1)
    assert first.returncode == 0, first.stderr
    assert checkpoints(out) == [f"{NAME}_final", f"{NAME}_step1", f"{NAME}_step2"]
    before = tree(out)

    line = one_line_error(train_run(train_shards, tiny_model_dir, out, "--max-steps", 2))
    assert f"--out-dir {out}: holds an earlier run" in line
    assert "--resume latest" in line and "--overwrite" in line
    assert tree(out) == before

    # A new run that cannot start (no such shards) leaves the earlier run whole, --overwrite or not.
    missing = tmp_path / "no-shards"
    one_line_error(train_run(missing, tiny_model_dir, out, "--max-steps", 2, "--overwrite"))
    assert tree(out) == before
    # A resume that would change the run's length is refused: its schedule and end are the checkpoint's.
    line = one_line_error(
        train_run(
            train_shards,
            tiny_model_dir,
            out,
            "--max-steps",
            5,
            "--resume",
            out / "lora" / f"{NAME}_step2",
        )
    )
    assert "total_steps was 3, now 5" in line
    assert tree(out) == before

    again = train_run(train_shards, tiny_model_dir, out, "--max-steps", 2, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert checkpoints(out) == [f"{NAME}_final"]  # the old run's step checkpoints are gone
    assert step_of(out / "lora" / f"{NAME}_final") == 2
    metrics = (out / "logs" / NAME / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]


def test_item2_out_dir_that_plora_did_not_write_or_that_is_protected(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    line = one_line_error(train_run(train_shards, tiny_model_dir, foreign, "--max-steps", 1))
    assert f"--out-dir {foreign}: is not empty and plora did not write it" in line and "--overwrite" in line
    for out, cwd in ((Path("."), tmp_path), (train_shards / "out", None), (tmp_path, tmp_path / "notes")):
        line = one_line_error(
            train_run(train_shards, tiny_model_dir, out, "--max-steps", 1, "--overwrite", cwd=cwd)
        )
        assert f"--out-dir {out}: " in line and "choose another --out-dir" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_an_out_dir_may_hold_the_runs_own_shards(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(train_shards, out / "data")
    done = train_run(out / "data", tiny_model_dir, out, "--max-steps", 1)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["data", "logs", "lora"]


def test_item2_second_train_into_one_out_dir_stops_at_once(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with held_lock(out):
        line = one_line_error(train_run(train_shards, tiny_model_dir, out, "--max-steps", 1))
    assert f"--out-dir {out}: another plora process" in line
    assert not (out / "lora").exists() or not any((out / "lora").iterdir())


@pytest.mark.slow
def test_item11_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_no_temporary(
    train_shards: Path, tiny_model_dir: Path, plora_bin: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = cli_args(train_shards, tiny_model_dir, out, "--max-steps", "2", "--save-interval", "1")
    done = run_on_small_disk(plora_bin, 40_000, *args, "--batch-size", "4")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    checkpoint = out / "lora" / f"{NAME}_step1"  # the user's path (training printed its plan above)
    last = done.stderr.splitlines()[-1]
    assert last == f"plora: error: {checkpoint}: cannot write the checkpoint: File too large"
    assert list((out / "lora").iterdir()) == []  # the partial checkpoint does not keep the disk full


def test_item16_save_total_limit_keeps_the_newest_and_the_resumed_checkpoint(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    steps = ["--max-steps", 4, "--save-interval", 1]
    first = train_run(train_shards, tiny_model_dir, out, *steps, "--save-total-limit", 2)
    assert first.returncode == 0, first.stderr
    assert checkpoints(out) == [f"{NAME}_final", f"{NAME}_step2", f"{NAME}_step3"]

    resumed_from = out / "lora" / f"{NAME}_step2"
    limit = ["--save_total_limit", 1]  # HF's spelling
    again = train_run(train_shards, tiny_model_dir, out, *steps, *limit, "--resume", resumed_from)
    assert again.returncode == 0, again.stderr
    # step 3 is rewritten and is the newest; step 2 stays only because the run resumed from it
    assert checkpoints(out) == [f"{NAME}_final", f"{NAME}_step2", f"{NAME}_step3"]
    assert step_of(resumed_from) == 2

    bad = train_run(train_shards, tiny_model_dir, tmp_path / "x", "--save-total-limit", -1)
    line = one_line_error(bad)
    assert "--save-total-limit must be >= 0" in line
