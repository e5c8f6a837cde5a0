"""Benchmark: a plora training step against a plain HuggingFace + PEFT causal-LM step on the same tokens.

One random-weight Qwen2 model (saved once with the tiny model's tokenizer), real rows tokenized from
shared/data/alpaca_2k.json (or the project's data/ samples) packed 8 branches of <= 128 tokens to a row:

1. step time, forward + backward + AdamW on one batch of ``--rows`` rows, alternating the two so that
   load on the machine hits both alike (median of ``--steps``; ``--clock cpu``, the default, counts this
   process's CPU time, which other processes on a shared machine do not inflate; use it with
   ``--threads 1``):
   - plora: 2D RoPE + isolated branch mask via parallel.forward (the trainer's PackedLoss module);
   - plain: the same PEFT LoRA model unpatched, ``model(input_ids, attention_mask, labels)``, i.e. an
     ordinary causal LM over the same padded tokens (goal: plora <= 1.10x);
2. data share: the real training loop (trainer.loop.train) for ``--steps`` steps: time spent in
   collation and host-to-device copies over the loop's time (goal: < 3%);
3. mask memory for 8 rows x 1024 tokens: plora's bool mask (sdpa) and FlexAttention BlockMask against
   a dense float32 additive mask;
4. activation checkpointing: the peak resident memory of one training step (forward + backward) on one
   row of 8 branches x 512 tokens without and with ``--gradient-checkpointing``, each in a fresh process
   (``--memory-only`` runs just this).

On CUDA it instead compares the two attention paths of a plora training step (forward + backward +
AdamW, the trainer's PackedLoss) on ``--rows`` (default 8) rows of 8 branches x 512 tokens each: flex
(FlexAttention BlockMask) against sdpa with plora's dense bool mask, reporting tokens/s, MFU and
``torch.cuda.max_memory_allocated``. MFU = 6 N tokens/s / peak, N = the base model's parameters; LoRA
training skips the frozen weights' gradients (about 4 N per token), so this MFU undercounts the useful
rate by design and is for comparing the two paths. Rows come from the contract's packer
(parallel.layout.build_row), tokens are random ids.

``--prefix`` runs only the shared-prefix comparison (CPU, float32, CPU-time clock): the training step
(forward + backward) of one row of K branches x n tokens (no trunk, random ids) with ``--attn prefix``
against dense masked SDPA, alternating, for ``--prefix-branches`` x ``--prefix-lengths`` on the small
shape and on SmolLM2-135M's (``--layers`` of its 30), with the bytes autograd saves for backward.

``--model-shape``: ``small`` (the default, sized for 2 CPU cores) or ``qwen2.5-0.5b`` (Qwen2.5-0.5B's
shape and vocabulary, random weights in ``--dtype``).

    python -m bench.train                      # CPU, sdpa, one thread, CPU-time clock
    python -m bench.train --memory-only        # CPU, only the checkpointing memory comparison
    python -m bench.train --device cuda --model-shape qwen2.5-0.5b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import platform
import re
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.shapes import QWEN2_5_0_5B, SMOLLM2_135M
from parallel.errors import Rejects
from parallel.forward import resolve_attn
from parallel.hfmodel import TORCH_DTYPES
from parallel.layout import IGNORE_INDEX, PackingOptions, SpecialTokens, TokenSequence, build_row
from parallel.masks import block_mask, dense_mask
from pipeline.convert import ConvertOptions
from pipeline.shards import open_shards
from pipeline.tinymodel import ensure_tiny_model
from pipeline.tokenize import TokenizeJob, tokenize_to_shards
from trainer.config import TrainConfig
from trainer.data import RowStore
from trainer.evaluate import autocast
from trainer.loop import train
from trainer.model import (
    PackedLoss,
    add_lora,
    apply_rope,
    count_parameters,
    enable_checkpointing,
    load_base_model,
    trainable_parameters,
)

REPO = Path(__file__).resolve().parents[1]
SHAPES: dict[str, dict[str, Any]] = {
    # Big enough that matmuls, not Python, dominate a CPU step; small enough for 2 cores.
    "small": {
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
    "qwen2.5-0.5b": QWEN2_5_0_5B,
    "smollm2-135m": SMOLLM2_135M,
}
GPU_BRANCHES, GPU_BRANCH_LEN = 8, 512  # the attention comparison's rows: 8 branches x 512 tokens
ATTENTION_PATHS = ("flex", "sdpa")  # FlexAttention BlockMask; sdpa with plora's dense bool mask
MEMORY_ROWS = 1  # the checkpointing memory comparison: one row of 8 x 512 tokens (a CPU step takes seconds)


def build_model(
    out: Path, tokenizer_dir: Path, shape: str, dtype: str, overrides: dict[str, Any] | None = None
) -> Path:
    """Random weights of the given shape (``overrides`` changed), saved in ``dtype``, with the tiny
    model's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    settings = {"model_type": "qwen2", **SHAPES[shape], **(overrides or {})}
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    AutoModelForCausalLM.from_config(config).to(TORCH_DTYPES[dtype]).save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def build_shards(out: Path, model_dir: Path) -> Path:
    alpaca = REPO.parent / "shared" / "data" / "alpaca_2k.json"
    inputs = (alpaca,) if alpaca.is_file() else tuple(sorted((REPO / "data").glob("sample_*")))
    packing = PackingOptions(branches=8, max_seq_len=128)
    job = TokenizeJob(inputs=inputs, tokenizer=model_dir, out=out, packing=packing, convert=ConvertOptions())
    tokenize_to_shards(job, Rejects("raise"), progress=False)
    return out


def fresh_model(
    model_dir: Path, *, patch: bool, device: torch.device, attn: str, dtype: str, checkpointing: bool = False
) -> tuple[torch.nn.Module, int]:
    """The PEFT LoRA model as the trainer builds it (2D RoPE or not, activation checkpointing or not)
    and the stride of its positions."""
    cfg = TrainConfig(shards="", base_model=str(model_dir), attn=attn, patch_rope=patch, dtype=dtype)
    torch.manual_seed(0)
    model = load_base_model(str(model_dir), attn=attn, device=device, dtype=dtype)
    rope = apply_rope(model, cfg)
    if checkpointing:
        enable_checkpointing(model, str(model_dir))
    return add_lora(model, cfg, None).to(device).train(), rope.stride  # train mode, as the trainer


def step_times(
    model_dir: Path, shards: Path, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    store = RowStore(open_shards(shards))
    rows = np.argsort(-store.num_tokens, kind="stable")[: args.rows]  # a full batch of the longest rows
    batch = store.collate(rows).to(device)
    plora, stride = fresh_model(model_dir, patch=True, device=device, attn=args.attn, dtype=args.dtype)
    plain, _ = fresh_model(model_dir, patch=False, device=device, attn=args.attn, dtype=args.dtype)
    loss_module = PackedLoss(plora, mask="isolated", stride=stride)
    trained = int((batch.labels != IGNORE_INDEX).sum())
    # The plain causal LM predicts every next real token of the padded rows (HF shifts labels itself).
    plain_labels = batch.input_ids.masked_fill(batch.attention_mask == 0, IGNORE_INDEX)
    optimizers = {
        "plora": torch.optim.AdamW(trainable_parameters(plora), lr=1e-4),
        "plain": torch.optim.AdamW(trainable_parameters(plain), lr=1e-4),
    }

    def plora_step() -> None:
        with autocast(device, args.dtype):
            loss = loss_module(
                batch.input_ids, batch.branch_id, batch.time_id, batch.attention_mask, batch.labels
            )
        (loss / trained).backward()

    def plain_step() -> None:
        with autocast(device, args.dtype):
            out = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=plain_labels)
            loss = out.loss
        loss.backward()

    steps = {"plora": plora_step, "plain": plain_step}
    times: dict[str, list[float]] = {name: [] for name in steps}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for i in range(args.warmup + args.steps):
        for name, run in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            run()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(clock() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "batch": list(batch.input_ids.shape),
        "tokens": batch.num_tokens,
        "plora_step_s": median["plora"],
        "plain_step_s": median["plain"],
        "ratio": median["plora"] / median["plain"],
    }


def data_share(model_dir: Path, shards: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cfg = TrainConfig(
        shards=str(shards), base_model=str(model_dir), out_dir=str(out), batch_size=args.rows,
        max_steps=args.steps, dtype=args.dtype, attn=args.attn, device=args.device,
        save_interval=10**9, log_interval=10**9, progress=False, group_by_length=True,
    )  # fmt: skip
    result = train(cfg)
    return {
        "steps": result.steps,
        "loop_s": result.seconds,
        "data_s": result.data_seconds,
        "share": result.data_seconds / result.seconds,
        "tokens_per_s": result.tokens / result.seconds,
    }


def packed_rows(
    rows: int, branches: int, branch_len: int, vocab: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``[rows, branches * branch_len]`` tensors of rows laid out by the contract's packer (random ids,
    every token trained, no trunk); the rows are of one length, so there is no padding."""
    rng = np.random.default_rng(seed)
    special = SpecialTokens(eos_id=2)
    built = [
        build_row(
            None,
            [TokenSequence.of(rng.integers(3, vocab, size=branch_len), True) for _ in range(branches)],
            "left",
            special,
        )
        for _ in range(rows)
    ]
    tensors = {
        name: torch.from_numpy(np.stack([getattr(r, name) for r in built]).astype(np.int64))
        for name in ("input_ids", "branch_id", "time_id", "labels")
    }
    return {**tensors, "attention_mask": torch.ones_like(tensors["input_ids"])}


def train_variant(
    model_dir: Path,
    batch: dict[str, torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
    *,
    attn: str,
    checkpointing: bool = False,
) -> dict[str, Any]:
    """``args.warmup + args.steps`` plora training steps (forward + backward + AdamW, the trainer's
    PackedLoss) on ``batch``: median step time, tokens/s, MFU, peak CUDA memory and the first step's mean
    token loss (every variant starts from the same weights, so first losses must agree)."""
    tokens = int(batch["attention_mask"].sum())
    trained = int((batch["labels"] != IGNORE_INDEX).sum())
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model, stride = fresh_model(
            model_dir, patch=True, device=device, attn=attn, dtype=args.dtype, checkpointing=checkpointing
        )
        sizes = count_parameters(model)
        base_params = sizes["total"] - sizes["trainable"]
        loss_module = PackedLoss(model, mask="isolated", stride=stride)
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
        times, first_loss = [], float("nan")
        for i in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with autocast(device, args.dtype):
                loss = loss_module(
                    batch["input_ids"], batch["branch_id"], batch["time_id"], batch["attention_mask"],
                    batch["labels"],
                ) / trained  # fmt: skip
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            if i == 0:
                first_loss = float(loss.detach())
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        step_s = statistics.median(times)
        return {
            "step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "mfu": 6 * base_params * tokens / step_s / (args.peak_tflops * 1e12),
            "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            "base_parameters": base_params,
            "first_loss": first_loss,
        }
    except torch.cuda.OutOfMemoryError:
        return {
            "error": "CUDA out of memory",
            "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device),
        }
    finally:
        model = loss_module = optimizer = loss = None  # free this variant before the next one


def attention_comparison(model_dir: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """tokens/s, MFU and peak memory of a plora training step with flex against dense-mask sdpa attention."""
    vocab = SHAPES[args.model_shape]["vocab_size"]
    batch = {k: v.to(device) for k, v in packed_rows(args.rows, GPU_BRANCHES, GPU_BRANCH_LEN, vocab).items()}
    results: dict[str, Any] = {
        "batch": list(batch["input_ids"].shape),
        "tokens": int(batch["attention_mask"].sum()),
    }
    for attn in ATTENTION_PATHS:
        results[attn] = train_variant(model_dir, batch, args, device, attn=attn)
    return results


def _memory_kib() -> dict[str, int]:
    """This process's resident set now and at its peak (Linux /proc), in KiB."""
    status = Path("/proc/self/status").read_text()
    return {key: int(value) for key, value in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE)}


def _step_memory(model_dir: Path, dtype: str, checkpointing: bool, threads: int) -> dict[str, Any]:
    """Run in a fresh process: the resident memory one CPU training step adds (forward + backward)."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    model, stride = fresh_model(
        model_dir, patch=True, device=device, attn="sdpa", dtype=dtype, checkpointing=checkpointing
    )
    batch = packed_rows(MEMORY_ROWS, GPU_BRANCHES, GPU_BRANCH_LEN, model.config.vocab_size)
    loss_module = PackedLoss(model, mask="isolated", stride=stride)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from what is resident now
    before = _memory_kib()["VmRSS"]
    start = time.perf_counter()
    with autocast(device, dtype):
        loss = loss_module(
            batch["input_ids"], batch["branch_id"], batch["time_id"], batch["attention_mask"], batch["labels"]
        )
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _memory_kib()["VmHWM"]
    return {"before_bytes": before * 1024, "peak_bytes": peak * 1024, "step_bytes": (peak - before) * 1024,
            "step_s": seconds}  # fmt: skip


def checkpointing_memory(model_dir: Path, dtype: str, threads: int) -> dict[str, Any]:
    """Peak memory of a CPU training step (forward + backward) on one row of 8 branches x 512 tokens without
    and with --gradient-checkpointing, each in its own process, so neither inherits the other's heap."""
    spawn = multiprocessing.get_context("spawn")
    results: dict[str, Any] = {"rows": MEMORY_ROWS, "tokens": GPU_BRANCHES * GPU_BRANCH_LEN}
    for name, on in (("off", False), ("on", True)):
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            results[name] = pool.submit(_step_memory, model_dir, dtype, on, threads).result()
    results["step_ratio"] = results["on"]["step_bytes"] / results["off"]["step_bytes"]
    results["peak_ratio"] = results["on"]["peak_bytes"] / results["off"]["peak_bytes"]
    return results


def mask_memory(rows: int = 8, branches: int = 8, branch_len: int = 128) -> dict[str, Any]:
    batch = packed_rows(rows, branches, branch_len, vocab=SHAPES["small"]["vocab_size"])
    boolean = dense_mask(batch["branch_id"], batch["time_id"], "isolated")
    blocks = block_mask(batch["branch_id"], batch["time_id"], "isolated")
    block_bytes = sum(
        t.numel() * t.element_size() for t in vars(blocks).values() if isinstance(t, torch.Tensor)
    )
    float_bytes = boolean.numel() * torch.finfo(torch.float32).bits // 8
    return {
        "rows": rows,
        "tokens": branches * branch_len,
        "dense_float32_bytes": float_bytes,
        "plora_bool_bytes": boolean.numel() * boolean.element_size(),
        "plora_block_mask_bytes": block_bytes,
        "visible_fraction": float(boolean.float().mean()),
    }


PREFIX_SHAPES = ("small", "smollm2-135m")  # the tiny shape and SmolLM2-135M's
PREFIX_PATHS = ("sdpa", "prefix")  # dense masked SDPA; shared-prefix attention (parallel.prefix)


def saved_activation_bytes(run: Any, model: torch.nn.Module) -> tuple[Any, int]:
    """``run()``'s result and the bytes of the tensors autograd saves for backward (each storage once,
    weights left out): the activation memory a training step holds at its peak, the part that
    attention changes. (CPU torch keeps no allocator statistics.)"""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return result, sum(storages.values())


def prefix_table(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Training step time and saved activations, prefix vs dense masked SDPA, one row of K branches x n
    tokens (no trunk, random ids) per (shape, K, n); the two alternate step by step."""
    results = []
    for shape in args.prefix_shapes:
        overrides = {"num_hidden_layers": args.layers} if args.layers and shape != "small" else None
        model_dir = build_model(work / shape, ensure_tiny_model(), shape, "float32", overrides)
        models = {attn: fresh_model(model_dir, patch=True, device=torch.device("cpu"), attn=attn,
                                    dtype="float32") for attn in PREFIX_PATHS}  # fmt: skip
        vocab = SHAPES[shape]["vocab_size"]
        for branches in args.prefix_branches:
            for branch_len in args.prefix_lengths:
                batch = packed_rows(1, branches, branch_len, vocab)
                trained = int((batch["labels"] != IGNORE_INDEX).sum())
                times: dict[str, list[float]] = {attn: [] for attn in PREFIX_PATHS}
                saved: dict[str, int] = {}
                for i in range(args.warmup + args.steps):
                    for attn, (model, stride) in models.items():
                        loss_module = PackedLoss(model, mask="isolated", stride=stride)
                        start = time.process_time()
                        inputs = [batch[name] for name in ("input_ids", "branch_id", "time_id",
                                                           "attention_mask", "labels")]  # fmt: skip
                        loss, saved[attn] = saved_activation_bytes(partial(loss_module, *inputs), model)
                        (loss / trained).backward()
                        model.zero_grad(set_to_none=True)
                        if i >= args.warmup:
                            times[attn].append(time.process_time() - start)
                step = {attn: statistics.median(t) for attn, t in times.items()}
                results.append({"shape": shape, "branches": branches, "branch_len": branch_len,
                                "tokens": int(batch["input_ids"].numel()),
                                **{f"{attn}_step_s": step[attn] for attn in PREFIX_PATHS},
                                **{f"{attn}_saved_bytes": saved[attn] for attn in PREFIX_PATHS}})  # fmt: skip
                print_prefix_row(results[-1])
    return results


def print_prefix_row(r: dict[str, Any]) -> None:
    mib = 1 << 20
    print(f"{r['shape']:13s} {r['branches']:3d} x {r['branch_len']:4d} ({r['tokens']:5d} tokens): step "
          f"dense {r['sdpa_step_s']:7.2f} s, prefix {r['prefix_step_s']:7.2f} s, "
          f"speed-up {r['sdpa_step_s'] / r['prefix_step_s']:5.2f}x; saved activations dense "
          f"{r['sdpa_saved_bytes'] / mib:7.1f} MiB, prefix {r['prefix_saved_bytes'] / mib:7.1f} MiB, "
          f"ratio {r['sdpa_saved_bytes'] / r['prefix_saved_bytes']:4.2f}x", flush=True)  # fmt: skip


def print_cpu_results(results: dict[str, Any]) -> None:
    step, data = results["step"], results["data"]
    print(f"step ({step['batch'][0]} rows x {step['batch'][1]} tokens, {step['tokens']} real): "
          f"plora {step['plora_step_s'] * 1e3:.0f} ms, plain HF+PEFT {step['plain_step_s'] * 1e3:.0f} ms, "
          f"ratio {step['ratio']:.3f} (goal <= 1.10)")  # fmt: skip
    print(f"data loading + collation: {data['data_s'] * 1e3:.1f} ms of {data['loop_s']:.2f} s over "
          f"{data['steps']} steps = {100 * data['share']:.2f}% (goal < 3%); "
          f"{data['tokens_per_s']:,.0f} tokens/s")  # fmt: skip


def print_memory_results(memory: dict[str, Any]) -> None:
    mib = 1 << 20
    print(f"training step (forward + backward), {memory['rows']} row x {memory['tokens']} tokens "
          "(8 branches x 512), one fresh process each:")  # fmt: skip
    for name, label in (("off", "without checkpointing"), ("on", "--gradient-checkpointing")):
        r = memory[name]
        print(f"  {label:25s} peak RSS {r['peak_bytes'] / mib:7,.0f} MiB, of which the step "
              f"{r['step_bytes'] / mib:7,.0f} MiB; {r['step_s']:.1f} s")  # fmt: skip
    print(
        f"  ratio with/without: step memory {memory['step_ratio']:.2f}, peak RSS {memory['peak_ratio']:.2f}"
    )


def print_gpu_results(results: dict[str, Any]) -> None:
    attention = results["attention"]
    rows, width = attention["batch"]
    print(f"plora training step, {rows} rows x {width} tokens ({GPU_BRANCHES} branches x {GPU_BRANCH_LEN}):")
    for attn in ATTENTION_PATHS:
        r = attention[attn]
        memory = f"max_memory_allocated {r['max_memory_allocated_bytes'] / (1 << 30):.2f} GiB"
        if "error" in r:
            print(f"  {attn:5s} {r['error']} ({memory})")
            continue
        print(f"  {attn:5s} {r['step_s'] * 1e3:.0f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, "
              f"MFU {100 * r['mfu']:.1f}%, {memory}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first (flex compiles in them).")
    parser.add_argument("--rows", type=int, help="Rows per batch (default 4 on CPU, 8 on CUDA).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn", default="sdpa", help="CPU comparison only; CUDA compares flex and sdpa.")
    parser.add_argument("--dtype", default=None, help="Default float32 on CPU, bfloat16 on CUDA.")
    parser.add_argument("--model-shape", choices=tuple(SHAPES), default="small")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="Peak dense TFLOP/s of the device in --dtype, for MFU (H100 SXM bf16: 989).",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU).")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="Step time clock (CPU).")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument(
        "--memory-only", action="store_true", help="CPU: only the activation checkpointing memory comparison."
    )
    parser.add_argument("--prefix", action="store_true",
                        help="Only compare --attn prefix with dense masked sdpa (CPU, float32).")  # fmt: skip
    parser.add_argument("--prefix-shapes", nargs="+", choices=PREFIX_SHAPES, default=list(PREFIX_SHAPES))
    parser.add_argument("--prefix-branches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--prefix-lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--layers", type=int, help="--prefix: layers of the SmolLM2-135M shape (default 30).")
    args = parser.parse_args()
    if args.prefix:
        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            table = prefix_table(args, Path(tmp))
        if args.json:
            args.json.write_text(json.dumps({"threads": args.threads, "rows": table}, indent=2) + "\n")
        return
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.rows = args.rows or (8 if gpu else 4)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if not gpu:
        torch.set_num_threads(args.threads)
        resolve_attn(args.attn, device)  # fail early on an unknown --attn
    machine = {"platform": platform.platform(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype,
               "model_shape": args.model_shape}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model", ensure_tiny_model(), args.model_shape, args.dtype)
        if gpu:
            machine["gpu"] = torch.cuda.get_device_name(device)
            results = {"machine": machine, "model": SHAPES[args.model_shape],
                       "attention": attention_comparison(model_dir, args, device)}  # fmt: skip
        else:
            results = {"machine": {**machine, "attn": args.attn, "clock": args.clock},
                       "model": SHAPES[args.model_shape]}  # fmt: skip
            if not args.memory_only:
                shards = build_shards(work / "shards", model_dir)
                results["step"] = step_times(model_dir, shards, args, device)
                results["data"] = data_share(model_dir, shards, args, work / "out")
            results["checkpointing"] = checkpointing_memory(model_dir, args.dtype, args.threads)
        results["mask"] = mask_memory()
    if gpu:
        print_gpu_results(results)
    else:
        if "step" in results:
            print_cpu_results(results)
        print_memory_results(results["checkpointing"])
    mask, mib = results["mask"], 1 << 20
    print(f"mask, {mask['rows']} rows x {mask['tokens']} tokens: dense float32 "
          f"{mask['dense_float32_bytes'] / mib:.1f} MiB, plora bool (sdpa) "
          f"{mask['plora_bool_bytes'] / mib:.1f} MiB, BlockMask (flex) "
          f"{mask['plora_block_mask_bytes'] / 1024:.1f} KiB")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
