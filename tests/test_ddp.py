"""DDP the torchrun way: two gloo processes train the same adapter as one process with the same global
batch (each process takes disjoint rows; the loss is normalised over the whole global batch)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from cli_helpers import run_cli, run_plora
from train_helpers import (
    REPO_ROOT,
    cli_args,
    max_adapter_difference,
    relative_adapter_difference,
    subprocess_env,
)

from pipeline.shards import open_shards
from trainer.checkpoint import final_checkpoint
from trainer.distributed import _HELD_WORKS, DistEnv, all_sum
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
    rows = open_shards(train_shards).manifest.num_rows
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
    one = run_cli(
        *cli_args(
            train_shards, tiny_model_dir, tmp_path / "one", "--batch-size", "4", "--attn", "sdpa", *flags
        ),
        env=subprocess_env(),
    )
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


HUNG_PEER = """
import datetime, sys, time
from trainer.distributed import all_sum, init_distributed, shorten_timeout
env = init_distributed("cpu")
shorten_timeout(env, datetime.timedelta(seconds=2))
if env.rank == 1:
    time.sleep(120)  # hung: never joins the next collective
started = time.monotonic()
try:
    all_sum([1.0], env)
except RuntimeError:
    print(f"failed after {time.monotonic() - started:.1f} s", flush=True)
"""


@pytest.mark.ddp
def test_after_shorten_timeout_a_hung_peer_fails_the_collective_in_that_time(tmp_path: Path) -> None:
    """The 3-hour startup timeout would let rank 0 wait for the hung rank 1 for hours."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**subprocess_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    ranks = [
        subprocess.Popen([sys.executable, "-c", HUNG_PEER], env={**env, "RANK": r, "LOCAL_RANK": r}, **pipes)
        for r in ("0", "1")
    ]
    try:
        stdout, stderr = ranks[0].communicate(timeout=60)
    finally:
        for rank in ranks:
            rank.kill()
            rank.communicate()
    waited = float(stdout.split()[2]) if stdout.startswith("failed after") else None
    assert waited is not None and waited < 10, stdout + stderr[-3000:]


def _worker_pid(launcher: subprocess.Popen[str], rank: int) -> int:
    """The pid of torchrun's worker of global rank ``rank`` (from /proc: its parent and environment)."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under torchrun (pid {launcher.pid})")


@pytest.mark.ddp
@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds torchrun's workers in /proc")
def test_a_signal_to_one_process_stops_every_process_at_the_same_step(
    train_shards: Path, tiny_model_dir: Path, plora_bin: Path, torchrun_bin: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    flags = ["--batch-size", "1", "--epochs", "4", "--save-interval", "3", "--log-interval", "1"]
    launch = [str(torchrun_bin), "--standalone", "--nproc_per_node", "2", "--no-python", str(plora_bin)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    run = subprocess.Popen(
        [*launch, *cli_args(train_shards, tiny_model_dir, out, *flags)], env=subprocess_env(), **pipes
    )
    deadline = time.monotonic() + 180
    while not list(out.glob("lora/*_step*")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run.poll() is None, "training ended before it could be stopped"
    os.kill(_worker_pid(run, 1), signal.SIGTERM)  # rank 1 only: rank 0 hears of it in the step's all-reduce
    _, stderr = run.communicate(timeout=300)

    lines = [line for line in stderr.splitlines() if line.startswith("plora: terminated at step ")]
    assert len(lines) == 2, stderr[-3000:]
    step = int(lines[0].split()[4].rstrip(":"))
    saved = out / "lora" / f"hf_parallel_lora_step{step}"
    how = f": saved {saved}; to continue, run the same command with --resume latest"
    # Rank 1 says where it stopped; rank 0, which wrote the checkpoint, says also where it is.
    assert sorted(lines) == [f"plora: terminated at step {step}", f"plora: terminated at step {step}{how}"]
    assert saved.is_dir() and not (out / "lora" / "hf_parallel_lora_final").exists()


def test_all_sum_keeps_its_last_collectives_to_the_end_of_the_process() -> None:
    """A gloo worker must never free an all_sum's tensor: that needs the GIL, which the main thread
    holds while it frees the DDP reducer and joins those workers (a deadlock seen in 2-process runs;
    see trainer.distributed._HELD_WORKS). A world of one runs the same code in this process."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        env = DistEnv(
            rank=0, world_size=2, local_rank=0, device=torch.device("cpu")
        )  # takes the collective path
        for n in range(20):
            assert all_sum([float(n), 1.0], env) == [float(n), 1.0]
        assert len(_HELD_WORKS) == _HELD_WORKS.maxlen and all(w.is_completed() for w in _HELD_WORKS)
    finally:
        dist.destroy_process_group()
