"""Crash safety: a run killed with SIGKILL leaves only whole checkpoints, and `--resume` from the last one
ends with the adapter an uninterrupted run writes, bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli
from train_helpers import adapter_tensors, cli_args, max_adapter_difference, subprocess_env

from pipeline.shards import open_shards
from trainer.checkpoint import final_checkpoint, lora_dir
from trainer.metrics import logs_dir, read_metrics

NAME = "hf_parallel_lora"
# Dropout, accumulation, length grouping and validation: everything that draws randomness or keeps state.
FLAGS = [
    "--epochs", "3", "--batch-size", "2", "--accumulation-steps", "2", "--learning-rate", "5e-3",
    "--lora-dropout", "0.1", "--group-by-length", "--val-fraction", "0.1", "--save-interval", "2",
    "--log-interval", "1", "--warmup", "3",
]  # fmt: skip


def _published(out: Path) -> list[Path]:
    return sorted(p for p in lora_dir(out).glob(f"{NAME}_*") if p.is_dir())


def _assert_whole(checkpoint: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors", "plora.json", "trainer_state/state.json",
                 "trainer_state/optimizer.safetensors"):  # fmt: skip
        assert (checkpoint / name).is_file(), f"{checkpoint} lacks {name}"
    json.loads((checkpoint / "plora.json").read_text())
    state = json.loads((checkpoint / "trainer_state" / "state.json").read_text())
    assert checkpoint.name == f"{NAME}_step{state['step']}"
    assert adapter_tensors(checkpoint)  # the safetensors file reads back whole


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(
    train_shards: Path, tiny_model_dir: Path, plora_bin: Path, tmp_path: Path
) -> None:
    # One thread (run_cli's default), as the killed process has: the adapters must agree to the bit.
    whole = run_cli(*cli_args(train_shards, tiny_model_dir, tmp_path / "whole", *FLAGS))
    assert whole.returncode == 0, whole.stderr[-3000:]
    total = int(json.loads((final_checkpoint(tmp_path / "whole", NAME) / "plora.json").read_text())["step"])
    rows = open_shards(train_shards).manifest.num_rows
    assert total == 3 * -(-(rows - round(0.1 * rows)) // 4)  # 3 epochs of ceil(training rows / 4) steps

    out = tmp_path / "killed"
    victim = subprocess.Popen(
        [plora_bin, *cli_args(train_shards, tiny_model_dir, out, *FLAGS)],
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_published(out)) < 3 and victim.poll() is None:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL, "training ended before it could be killed"
    published = _published(out)
    assert published and not final_checkpoint(out, NAME).exists()
    for checkpoint in published:
        _assert_whole(checkpoint)
    killed_at = max(int(p.name.rsplit("step", 1)[1]) for p in published)
    assert killed_at < total

    resumed = run_cli(*cli_args(train_shards, tiny_model_dir, out, *FLAGS, "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {killed_at}" in resumed.stderr.replace("\n", " ")
    finals = final_checkpoint(out, NAME), final_checkpoint(tmp_path / "whole", NAME)
    assert max_adapter_difference(*finals) == 0.0
    # Leftover temporaries of the killed run are gone; the metrics read as one run.
    assert not [p for p in lora_dir(out).iterdir() if p.name.startswith(".")]
    steps = [r["step"] for r in read_metrics(logs_dir(out, NAME) / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, total + 1))
    losses = [
        [r["loss"] for r in read_metrics(logs_dir(run, NAME) / "metrics.jsonl") if "loss" in r]
        for run in (out, tmp_path / "whole")
    ]
    assert losses[0] == losses[1]
