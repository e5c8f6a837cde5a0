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
   a dense float32 additive mask.

    python -m bench.train                      # CPU, sdpa, one thread, CPU-time clock
    python -m bench.train --device cuda --attn sdpa --dtype bfloat16 --rows 16 --clock wall
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parallel.forward import resolve_attn
from parallel.layout import IGNORE_INDEX, PackingOptions
from parallel.masks import block_mask, dense_mask
from pipeline.convert import ConvertOptions
from pipeline.errors import Rejects
from pipeline.shards import open_shards
from pipeline.tinymodel import ensure_tiny_model
from pipeline.tokenize import TokenizeJob, tokenize_to_shards
from trainer.config import TrainConfig
from trainer.data import RowStore
from trainer.evaluate import autocast
from trainer.loop import train
from trainer.model import PackedLoss, add_lora, apply_rope, load_base_model, trainable_parameters

REPO = Path(__file__).resolve().parents[1]
# Big enough that matmuls, not Python, dominate a CPU step; small enough for 2 cores.
SHAPE: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}


def build_model(out: Path, tokenizer_dir: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**SHAPE)).save_pretrained(str(out))
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
    model_dir: Path, *, patch: bool, device: torch.device, attn: str, dtype: str
) -> tuple[torch.nn.Module, int]:
    """The PEFT LoRA model as the trainer builds it (2D RoPE or not) and the stride of its positions."""
    cfg = TrainConfig(shards="", base_model=str(model_dir), attn=attn, patch_rope=patch, dtype=dtype)
    torch.manual_seed(0)
    model = load_base_model(str(model_dir), attn=attn, device=device, dtype=dtype)
    rope = apply_rope(model, cfg)
    return add_lora(model, cfg, None).to(device), rope.stride


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


def mask_memory(rows: int = 8, branches: int = 8, branch_len: int = 128) -> dict[str, Any]:
    length = branches * branch_len
    branch_id = torch.arange(branches).repeat_interleave(branch_len).expand(rows, length).contiguous()
    time_id = torch.arange(branch_len).repeat(branches).expand(rows, length).contiguous()
    boolean = dense_mask(branch_id, time_id, "isolated")
    blocks = block_mask(branch_id, time_id, "isolated")
    block_bytes = sum(
        t.numel() * t.element_size() for t in vars(blocks).values() if isinstance(t, torch.Tensor)
    )
    float_bytes = boolean.numel() * torch.finfo(torch.float32).bits // 8
    return {
        "rows": rows,
        "tokens": length,
        "dense_float32_bytes": float_bytes,
        "plora_bool_bytes": boolean.numel() * boolean.element_size(),
        "plora_block_mask_bytes": block_bytes,
        "visible_fraction": float(boolean.float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU).")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="Step time clock.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    resolve_attn(args.attn, device)  # fail early on an unknown --attn
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model", ensure_tiny_model())
        shards = build_shards(work / "shards", model_dir)
        results = {
            "machine": {"platform": platform.platform(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "device": args.device, "attn": args.attn,
                        "dtype": args.dtype, "clock": args.clock},
            "model": SHAPE,
            "step": step_times(model_dir, shards, args, device),
            "data": data_share(model_dir, shards, args, work / "out"),
            "mask": mask_memory(),
        }  # fmt: skip
    step, data, mask = results["step"], results["data"], results["mask"]
    print(f"step ({step['batch'][0]} rows x {step['batch'][1]} tokens, {step['tokens']} real): "
          f"plora {step['plora_step_s'] * 1e3:.0f} ms, plain HF+PEFT {step['plain_step_s'] * 1e3:.0f} ms, "
          f"ratio {step['ratio']:.3f} (goal <= 1.10)")  # fmt: skip
    print(f"data loading + collation: {data['data_s'] * 1e3:.1f} ms of {data['loop_s']:.2f} s over "
          f"{data['steps']} steps = {100 * data['share']:.2f}% (goal < 3%); "
          f"{data['tokens_per_s']:,.0f} tokens/s")  # fmt: skip
    mib = 1 << 20
    print(f"mask, {mask['rows']} rows x {mask['tokens']} tokens: dense float32 "
          f"{mask['dense_float32_bytes'] / mib:.1f} MiB, plora bool (sdpa) "
          f"{mask['plora_bool_bytes'] / mib:.1f} MiB, BlockMask (flex) "
          f"{mask['plora_block_mask_bytes'] / 1024:.1f} KiB")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
