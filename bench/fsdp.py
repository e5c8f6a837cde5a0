"""Benchmark: the step time of `plora train --fsdp` (FSDP2) against DDP, 2 processes under torchrun on CPU.

The same run (bench.train's small random-weight Qwen2, rows of 8 branches x <= 128 tokens, batch 2 per
process, float32, gloo, one thread per process) is launched with and without ``--fsdp``, alternating,
``--repeats`` times each. A step's time is the gap between consecutive steps in the run's
metrics.jsonl (the first step, which warms up, is left out); the figure is the median over every
run's steps. FSDP all-gathers each layer's weights in forward and again in backward and
reduce-scatters the gradients; DDP all-reduces only the LoRA gradients, so on CPU the ratio is the
price FSDP pays for holding 1/N of the weights.

    python -m bench.fsdp [--steps 12] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.train import build_model, build_shards
from pipeline.tinymodel import ensure_tiny_model

MODES = {"DDP": [], "FSDP": ["--fsdp"]}


def run_steps(model: Path, shards: Path, out: Path, steps: int, extra: list[str]) -> list[float]:
    """Seconds of each step after the first, from the run's metrics."""
    bin_dir = Path(sys.executable).parent
    command = [
        str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python",
        str(bin_dir / "plora"), "train", "--shards", str(shards), "--base-model", str(model),
        "--out-dir", str(out), "--device", "cpu", "--dtype", "float32", "--no-progress",
        "--batch-size", "2", "--max-steps", str(steps), "--log-interval", "1",
        "--save-interval", str(steps), "--overwrite", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, env=env, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "logs/hf_parallel_lora/metrics.jsonl").open()]
    times = [r["time"] for r in records if "loss" in r]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(work / "model", ensure_tiny_model(), "small", "float32")
        shards = build_shards(work / "shards", model)
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode, extra in MODES.items():
                seconds[mode] += run_steps(model, shards, work / mode, args.steps, extra)
    print(
        f"bench.fsdp: {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
        f"2 processes (gloo, 1 thread each), small Qwen2 shape, batch 2 per process, float32"
    )
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    for mode, value in median.items():
        print(f"{mode:5} step {value * 1000:7.1f} ms  (median of {len(seconds[mode])} steps)")
    print(f"ratio FSDP/DDP: {median['FSDP'] / median['DDP']:.2f}")


if __name__ == "__main__":
    main()
