"""FSDP2 (`--fsdp`) under torchrun: two gloo processes, each holding half of every weight, train the
adapter one process trains with the same global batch, write the same full (unsharded) checkpoints,
and resume bit-identically after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import run_plora
from safetensors.torch import load_file
from train_helpers import (
    cli_args,
    max_adapter_difference,
    quick_config,
    relative_adapter_difference,
    subprocess_env,
)

from parallel.errors import PloraError
from pipeline.shards import open_shards
from trainer.checkpoint import OPTIMIZER_FILE, STATE_DIR, final_checkpoint, lora_dir
from trainer.config import TrainConfig
from trainer.loop import train
from trainer.metrics import logs_dir, read_metrics

NAME = "hf_parallel_lora"
STEPS = 12
VAL_ROWS = 5  # 3 and 2 per rank: 2 validation batches and 1, which FSDP's ranks must still match
# Accumulation, length grouping and validation; no dropout: it draws per process, so one process
# would draw other masks than two.
FLAGS = [
    "--max-steps", str(STEPS), "--accumulation-steps", "2", "--learning-rate", "1e-2", "--warmup", "2",
    "--group-by-length", "--eval-interval", "4", "--save-interval", "2", "--log-interval", "1",
]  # fmt: skip
# Activation checkpointing rides along: recomputing a layer gathers its shards again, and the result
# must still be one process's (which runs without it).
SHARDED = ["--batch-size", "2", "--fsdp", "--gradient-checkpointing"]


def _torchrun(torchrun_bin: Path, plora_bin: Path, *args: str) -> list[str]:
    return [str(torchrun_bin), "--standalone", "--nproc_per_node", "2", "--no-python", str(plora_bin), *args]


def _run_torchrun(torchrun_bin: Path, plora_bin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A 2-process run; one that hangs (a rank left waiting in a collective) is killed, ranks included."""
    command = _torchrun(torchrun_bin, plora_bin, *args)
    run = subprocess.Popen(
        command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = run.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        for pid in (*_children(run.pid), run.pid):
            os.kill(pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(command, run.returncode, stdout, stderr)


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (torchrun puts its ranks in sessions of their own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def flags(train_shards: Path) -> list[str]:
    return [*FLAGS, "--val-fraction", str(VAL_ROWS / open_shards(train_shards).manifest.num_rows)]


@pytest.fixture(scope="module")
def fsdp_done(
    train_shards: Path, tiny_model_dir: Path, plora_bin: Path, torchrun_bin: Path, flags: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, str]:  # fmt: skip
    """An uninterrupted 2-process FSDP run (batch 2 per process: global batch 8): its output directory
    and its stderr."""
    out = tmp_path_factory.mktemp("fsdp") / "two"
    args = cli_args(train_shards, tiny_model_dir, out, *SHARDED, *flags)
    done = _run_torchrun(torchrun_bin, plora_bin, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 8 = 2 x 2 process(es)" in done.stderr.replace("\n", " ")
    return out, done.stderr


@pytest.fixture(scope="module")
def fsdp_run(fsdp_done: tuple[Path, str]) -> Path:
    return fsdp_done[0]


@pytest.mark.ddp
def test_fsdp_rank_1_reads_no_base_weight(fsdp_done: tuple[Path, str]) -> None:
    """Rank 1 builds the base on meta and gets its shards from rank 0: a base one device cannot hold
    still trains. The count is of rank 1's real (non-meta) parameters right after building it."""
    assert "rank 1: 0 bytes of base weights before sharding" in fsdp_done[1]
    assert "rank 0:" not in fsdp_done[1]  # rank 0 reads them all (into CPU memory)


@pytest.mark.ddp
def test_fsdp_matches_one_process_with_the_same_global_batch(
    fsdp_run: Path, train_shards: Path, tiny_model_dir: Path, plora_bin: Path, flags: list[str],
    tmp_path: Path,
) -> None:  # fmt: skip
    one = run_plora(
        plora_bin, *cli_args(train_shards, tiny_model_dir, tmp_path / "one", "--batch-size", "4", *flags),
        env=subprocess_env(), timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    logged = [read_metrics(logs_dir(run, NAME) / "metrics.jsonl") for run in (fsdp_run, tmp_path / "one")]
    assert len(logged[0]) == len(logged[1]) == STEPS + STEPS // 4  # every step, and 3 validations
    for a, b in zip(*logged, strict=True):
        assert sorted(a) == sorted(b)
        for key in {"loss", "grad_norm", "val_loss"} & set(a):
            assert a[key] == pytest.approx(b[key], rel=1e-5)
    finals = final_checkpoint(fsdp_run, NAME), final_checkpoint(tmp_path / "one", NAME)
    assert relative_adapter_difference(*finals) < 1e-5
    assert max_adapter_difference(*finals) < 1e-3
    # The checkpoint holds full tensors, as one process's does: same names, same shapes, same values.
    moments = [load_file(str(final / STATE_DIR / OPTIMIZER_FILE)) for final in finals]
    assert sorted(moments[0]) == sorted(moments[1])
    for key, value in moments[0].items():
        assert value.shape == moments[1][key].shape
        assert float((value - moments[1][key]).abs().max()) < 1e-5, key
    # Only rank 0 wrote.
    names = sorted(p.name for p in lora_dir(fsdp_run).iterdir())
    assert names == sorted([f"{NAME}_final", *(f"{NAME}_step{s}" for s in range(2, STEPS, 2))])


@pytest.mark.ddp
def test_fsdp_resumes_bit_identically_after_sigkill(
    fsdp_run: Path, train_shards: Path, tiny_model_dir: Path, plora_bin: Path, torchrun_bin: Path,
    flags: list[str], tmp_path: Path,
) -> None:  # fmt: skip
    out = tmp_path / "killed"
    args = cli_args(train_shards, tiny_model_dir, out, *SHARDED, *flags)
    victim = subprocess.Popen(
        _torchrun(torchrun_bin, plora_bin, *args), env=subprocess_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(lora_dir(out).glob(f"{NAME}_step*")):
        time.sleep(0.01)
    for pid in (*_children(victim.pid), victim.pid):  # both ranks at once, as a lost node would
        os.kill(pid, signal.SIGKILL)
    victim.wait(timeout=30)
    published = sorted(int(p.name.rsplit("step", 1)[1]) for p in lora_dir(out).glob(f"{NAME}_step*"))
    assert published and not final_checkpoint(out, NAME).exists(), "training ended before it was killed"

    resumed = _run_torchrun(torchrun_bin, plora_bin, *args, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {published[-1]}" in resumed.stderr.replace("\n", " ")
    for file in ("adapter_model.safetensors", f"{STATE_DIR}/{OPTIMIZER_FILE}"):
        assert (final_checkpoint(out, NAME) / file).read_bytes() == (
            final_checkpoint(fsdp_run, NAME) / file
        ).read_bytes(), file


def test_fsdp_needs_more_than_one_process(train_shards: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PloraError, match=r"^--fsdp shards the model over the processes torchrun starts"):
        train(quick_config(train_shards, tiny_model_dir, tmp_path / "out", fsdp=True, max_steps=1))


def test_fsdp_refuses_float16() -> None:
    cfg = TrainConfig(shards="s", base_model="m", fsdp=True, dtype="float16")
    with pytest.raises(PloraError, match=r"^--fsdp with --dtype float16: .*use --dtype bfloat16 or float32$"):
        cfg.validate()
