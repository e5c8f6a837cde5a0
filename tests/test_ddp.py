"""DDP the torchrun way: two gloo processes train the same adapter as one process with the same global
batch (each process takes disjoint rows; the loss is normalised over the whole global batch)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import run_plora
from train_helpers import (
    cli_args,
    max_adapter_difference,
    relative_adapter_difference,
    subprocess_env,
)

from pipeline.shards import open_shards
from trainer.checkpoint import final_checkpoint
from trainer.metrics import logs_dir, read_metrics


@pytest.mark.ddp
@pytest.mark.parametrize("attn", ["sdpa", "prefix"])
def test_two_processes_match_one_with_the_same_global_batch(
    attn: str, train_shards: Path, tiny_model_dir: Path, plora_bin: Path, torchrun_bin: Path, tmp_path: Path
) -> None:
    """The two processes run ``attn`` (prefix: padding-free micro-batches), the one process dense sdpa."""
    # Global batch 8 (2 rows x 2 processes x 2 accumulation steps). Hold out rows so that 8k + 1 remain for
    # training: the last step has one row, so both processes have an empty micro-batch there and join
    # with a weightless row. Validation rows are split between the processes.
    rows = open_shards(train_shards).manifest["num_rows"]
    held_out = (rows - 1) % 8 or 8
    steps = (rows - held_out) // 8 + 1
    flags = ["--learning-rate", "1e-2", "--accumulation-steps", "2", "--val-fraction", str(held_out / rows)]
    flags += ["--log-interval", "1", "--eval-interval", str(steps)]
    launch = ["--standalone", "--nproc_per_node", "2", "--no-python", str(plora_bin)]
    two_args = cli_args(
        train_shards, tiny_model_dir, tmp_path / "two", "--batch-size", "2", "--attn", attn, *flags
    )
    two = run_plora(torchrun_bin, *launch, *two_args, env=subprocess_env(), timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 8 = 2 x 2 process(es)" in two.stderr.replace("\n", " ")
    one_args = cli_args(
        train_shards, tiny_model_dir, tmp_path / "one", "--batch-size", "4", "--attn", "sdpa", *flags
    )
    one = run_plora(plora_bin, *one_args, env=subprocess_env(), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    name = "hf_parallel_lora"
    two_final, one_final = final_checkpoint(tmp_path / "two", name), final_checkpoint(tmp_path / "one", name)
    # Adam hides a constant factor in the gradient; the logged gradient norms and losses do not.
    logged = [read_metrics(logs_dir(tmp_path / run, name) / "metrics.jsonl") for run in ("two", "one")]
    assert len(logged[0]) == len(logged[1]) == steps + 1  # every step, and validation at the end
    for a, b in zip(*logged, strict=True):
        assert sorted(a) == sorted(b)
        for key in {"loss", "grad_norm", "val_loss"} & set(a):
            assert a[key] == pytest.approx(b[key], rel=1e-5)
    assert relative_adapter_difference(two_final, one_final) < 1e-5
    assert max_adapter_difference(two_final, one_final) < 1e-3  # a few near-zero-gradient weights at most
    # Only rank 0 wrote: one final checkpoint, one metrics file.
    assert sorted(p.name for p in (tmp_path / "two" / "lora").iterdir()) == [f"{name}_final"]
