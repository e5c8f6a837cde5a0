"""Every CUDA check of plora in one run (under 8 minutes on one H200), printed as markdown tables.

1. Training steps (forward + backward + AdamW through the trainer's PackedLoss, LoRA on all linear
   layers, 2D RoPE, isolated mask) on the Qwen2.5-0.5B shape with random weights, frozen base in bf16
   under autocast, on 8 rows of 8 branches x 512 tokens: flex attention (BlockMask), shared-prefix
   attention (``--attn prefix``) and sdpa (dense bool mask), each without and with
   ``--gradient-checkpointing``. Reports ms/step, tokens/s, MFU (see
   bench.train), peak CUDA memory and the first step's loss; every variant starts from the same weights on
   the same batch, so each first loss must equal the first variant's within the dtype's tolerance.
2. Parallel decoding (parallel.generation.decode_parallel: K branches in one sequence, one KV cache),
   tokens/s at K = 1, 4, 16, with each attention implementation.

It needs torch, transformers and peft only (no datasets, polars or network): the model is built from a
config with random weights, the token ids are random. No check starts after ``--budget-minutes``
(7.5). Exit status 1 when a check fails (an error, first losses that differ, or skipped for time).

    python -m bench.gpu_check                  # CUDA, the full check
    python -m bench.gpu_check --smoke          # CPU in seconds: small shape, sdpa and prefix (CPU flex
                                               # has no backward), few steps and tokens; make test runs this
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.generate import make_prompts, run_parallel, timed
from bench.train import SHAPES, build_model, packed_rows, train_variant
from parallel.errors import first_line
from parallel.layout import DEFAULT_STRIDE
from parallel.rope2d import patch_model_2d_rope
from trainer.model import load_base_model

# Relative difference allowed between the first losses of two variants, by autocast dtype.
LOSS_RTOL = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}


@dataclass(frozen=True)
class CheckSetup:
    shape: str  # a bench.train shape
    dtype: str
    attns: tuple[str, ...]
    rows: int
    branches: int
    branch_len: int
    warmup: int
    steps: int
    ks: tuple[int, ...]
    trunk_len: int
    prompt_len: int
    new_tokens: int


FULL = CheckSetup(
    shape="qwen2.5-0.5b", dtype="bfloat16", attns=("flex", "prefix", "sdpa"), rows=8, branches=8,
    branch_len=512,
    warmup=2, steps=5, ks=(1, 4, 16), trunk_len=128, prompt_len=8, new_tokens=64,
)  # fmt: skip
SMOKE = CheckSetup(
    shape="small", dtype="float32", attns=("sdpa", "prefix"), rows=2, branches=2, branch_len=16,
    warmup=0, steps=1, ks=(1, 4, 16), trunk_len=8, prompt_len=4, new_tokens=3,
)  # fmt: skip


SKIPPED = {"error": "skipped: the time budget was spent"}


def training_checks(
    model_dir: Path, setup: CheckSetup, device: torch.device, peak_tflops: float, deadline: float = math.inf
) -> list[dict[str, Any]]:
    """One row per (attention, checkpointing): bench.train.train_variant's figures, or the error; no new
    variant starts after ``deadline`` (time.perf_counter)."""
    vocab = SHAPES[setup.shape]["vocab_size"]
    batch = packed_rows(setup.rows, setup.branches, setup.branch_len, vocab)
    batch = {k: v.to(device) for k, v in batch.items()}
    args = argparse.Namespace(
        dtype=setup.dtype, warmup=setup.warmup, steps=setup.steps, peak_tflops=peak_tflops
    )
    results = []
    for attn in setup.attns:
        for checkpointing in (False, True):
            if time.perf_counter() > deadline:
                results.append({"attn": attn, "checkpointing": checkpointing, **SKIPPED})
                continue
            try:
                figures = train_variant(
                    model_dir, batch, args, device, attn=attn, checkpointing=checkpointing
                )
            except Exception as err:  # noqa: BLE001 - one failed variant must not hide the others' figures
                figures = {"error": f"{type(err).__name__}: {first_line(err)}"}
            results.append({"attn": attn, "checkpointing": checkpointing, **figures})
    reference = next((r["first_loss"] for r in results if "first_loss" in r), None)
    for r in results:
        if "first_loss" in r and reference is not None:
            r["loss_rel_diff"] = abs(r["first_loss"] - reference) / abs(reference)
            r["loss_ok"] = math.isfinite(r["first_loss"]) and r["loss_rel_diff"] <= LOSS_RTOL[setup.dtype]
    return results


def decoding_checks(
    model_dir: Path, setup: CheckSetup, device: torch.device, deadline: float = math.inf
) -> list[dict[str, Any]]:
    """tokens/s of parallel decoding for each attention implementation and K (best of 2, after a warmup)."""
    results = []
    for attn in setup.attns:
        if time.perf_counter() > deadline:
            results.append({"attn": attn, **SKIPPED})
            continue
        try:
            model = load_base_model(str(model_dir), attn=attn, device=device, dtype=setup.dtype).eval()
            patch_model_2d_rope(model, stride=DEFAULT_STRIDE)
            vocab = model.config.vocab_size
            run_parallel(model, *make_prompts(2, 8, 4, vocab), 2)  # compiles flex's kernels
            for k in setup.ks:
                trunk, prompts = make_prompts(k, setup.trunk_len, setup.prompt_len, vocab)
                run = functools.partial(run_parallel, model, trunk, prompts, setup.new_tokens)
                seconds = min(timed(run, device.type, time.perf_counter)[0] for _ in range(2))
                produced = k * setup.new_tokens
                results.append({"attn": attn, "k": k, "tokens": produced, "seconds": seconds,
                                "tokens_per_s": produced / seconds})  # fmt: skip
        except Exception as err:  # noqa: BLE001 - a failed decode is a row, not an abort
            results.append({"attn": attn, "error": f"{type(err).__name__}: {first_line(err)}"})
        finally:
            model = None
    return results


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / (1 << 30):.2f} GiB"


def training_table(results: list[dict[str, Any]], setup: CheckSetup) -> list[str]:
    tokens = setup.rows * setup.branches * setup.branch_len
    lines = [
        f"### Training step: {setup.rows} rows x {setup.branches} branches x {setup.branch_len} tokens "
        f"({tokens:,} tokens), {setup.dtype}, median of {setup.steps} after {setup.warmup} warmup",
        "",
        "| attention | checkpointing | ms/step | tokens/s | MFU | peak memory | first loss | vs first | ok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        head = f"| {r['attn']} | {'on' if r['checkpointing'] else 'off'} |"
        if "error" in r:
            lines.append(
                f"{head} | | | {_gib(r.get('max_memory_allocated_bytes'))} | | | FAIL: {r['error']} |"
            )
            continue
        lines.append(
            f"{head} {r['step_s'] * 1e3:,.0f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
            f"{_gib(r['max_memory_allocated_bytes'])} | {r['first_loss']:.4f} | {r['loss_rel_diff']:.1e} | "
            f"{'yes' if r['loss_ok'] else 'FAIL'} |"
        )
    return lines


def decoding_table(results: list[dict[str, Any]], setup: CheckSetup) -> list[str]:
    lines = [
        f"### Parallel decoding: trunk {setup.trunk_len} tokens, K prompts of {setup.prompt_len}-"
        f"{setup.prompt_len + 2} tokens, {setup.new_tokens} new tokens per branch, best of 2",
        "",
        "| attention | K | tokens/s | seconds |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['attn']} | | | FAIL: {r['error']} |")
        else:
            lines.append(f"| {r['attn']} | {r['k']} | {r['tokens_per_s']:,.1f} | {r['seconds']:.3f} |")
    return lines


def failures(training: list[dict[str, Any]], decoding: list[dict[str, Any]]) -> int:
    return sum("error" in r or not r.get("loss_ok", False) for r in training) + sum(
        "error" in r for r in decoding
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, small shape, sdpa only, a few steps.")
    parser.add_argument("--device", default=None, help="Default cuda (cpu with --smoke).")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="Peak dense bf16 TFLOP/s for MFU (H100/H200 SXM: 989).",
    )
    parser.add_argument(
        "--budget-minutes", type=float, default=7.5, help="Start no further check after this long."
    )
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cpu":
        torch.set_num_threads(1)  # the smoke run's matmuls are tiny; more threads only contend
    started = time.perf_counter()
    deadline = started + 60 * args.budget_minutes
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    import transformers

    print(f"## plora GPU check{' (smoke)' if args.smoke else ''}: {where}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {setup.shape} shape, random weights\n")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", Path(tmp), setup.shape, setup.dtype)
        training = training_checks(model_dir, setup, device, args.peak_tflops, deadline)
        print("\n".join(training_table(training, setup)) + "\n", flush=True)
        decoding = decoding_checks(model_dir, setup, device, deadline)
        print("\n".join(decoding_table(decoding, setup)) + "\n")
    failed = failures(training, decoding)
    minutes = (time.perf_counter() - started) / 60
    print(f"{'all checks passed' if not failed else f'{failed} check(s) FAILED'} in {minutes:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
