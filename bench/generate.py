"""Benchmark: K branches decoded in one sequence vs K separate generations vs HF batched `generate`.

For each K, every method produces the same number of new tokens per branch (greedy, no early stop)
from the same trunk and K distinct branch prompts:

- parallel: parallel.generation.decode_parallel, one sequence, one KV cache (the trunk held once);
- separate: decode_parallel K times, one branch each (the trunk prefilled K times);
- hf-batched: `model.generate` over K left-padded prompts (trunk + branch prompt), its own KV cache
  holding the trunk K times. It runs with the same CPU linear layers as plora's decoder
  (parallel.skinny_linear), so the comparison is of the layouts, not of matmul kernels.

Reports tokens/s, speedups and the KV cache size of each. Random weights; no network.

    python -m bench.generate                                   # CPU, small random Qwen2
    python -m bench.generate --device cuda --model-shape qwen2.5-0.5b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.shapes import QWEN2_5_0_5B
from parallel.decoder import decode_parallel
from parallel.hfmodel import TORCH_DTYPES
from parallel.layout import SpecialTokens
from parallel.rope2d import patch_model_2d_rope
from parallel.skinny_linear import weight_major_linears

SHAPES: dict[str, dict[str, Any]] = {
    # Small enough for a 2-core CPU, big enough that matmuls, not Python, dominate a step.
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 16384,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "qwen2.5-0.5b": QWEN2_5_0_5B,
}
EOS = 2


def kv_cache_bytes(config: Any, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of a full-attention KV cache holding ``tokens`` tokens (keys and values, every layer)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * heads * head_dim * element * tokens


def build_model(shape: str, dtype: torch.dtype, device: str, attn: str, stride: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[shape], bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    model = model.to(device).eval()
    patch_model_2d_rope(model, stride=stride)
    return model


def make_prompts(k: int, trunk_len: int, branch_len: int, vocab: int) -> tuple[list[int], list[list[int]]]:
    generator = torch.Generator().manual_seed(k)
    trunk = torch.randint(3, vocab, (trunk_len,), generator=generator).tolist()
    # Distinct branch prompts of slightly different lengths, as real ones would be.
    prompts = [
        torch.randint(3, vocab, (branch_len + (i % 3),), generator=generator).tolist() for i in range(k)
    ]
    return trunk, prompts


def timed(fn: Callable[[], Any], device: str, clock: Callable[[], float]) -> tuple[float, Any]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = clock()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return clock() - start, out


def run_parallel(model: torch.nn.Module, trunk: list[int], prompts: list[list[int]], new: int) -> Any:
    return decode_parallel(model, trunk, prompts, special=SpecialTokens(EOS), max_new_tokens=new, stop_ids=())


def run_separate(model: torch.nn.Module, trunk: list[int], prompts: list[list[int]], new: int) -> list[Any]:
    return [
        decode_parallel(
            model, trunk, [p], special=SpecialTokens(EOS), max_new_tokens=new, stop_ids=(), branch_ids=[i + 1]
        )
        for i, p in enumerate(prompts)
    ]


def run_hf(model: torch.nn.Module, trunk: list[int], prompts: list[list[int]], new: int, device: str) -> Any:
    rows = [trunk + p for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding, as HF generation of decoder-only models wants
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    with torch.no_grad(), weight_major_linears(model):
        return model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=EOS,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default=None, help="bf16 on CUDA, else fp32")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--ks", default="1,2,4,8,16", help="comma-separated branch counts")
    parser.add_argument("--trunk-len", type=int, default=128)
    parser.add_argument("--branch-len", type=int, default=8, help="branch prompt length (+0..2 tokens)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per method")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time (with --threads 1, steady on a machine shared with other jobs)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU work; use wall time on a GPU")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    dtype = TORCH_DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    model = build_model(args.model_shape, dtype, args.device, args.attn, args.stride)
    params = sum(p.numel() for p in model.parameters())
    console = Console(width=110)
    console.print(
        f"{args.model_shape} Qwen2 ({params / 1e6:.1f}M params, {dtype}, {args.attn}) on {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; "
        f"trunk {args.trunk_len} tokens, "
        f"branch prompts {args.branch_len}-{args.branch_len + 2}, {args.new_tokens} new tokens per branch"
    )
    vocab = model.config.vocab_size
    warm_trunk, warm_prompts = make_prompts(2, 16, 4, vocab)
    run_parallel(model, warm_trunk, warm_prompts, 4)
    run_hf(model, warm_trunk, warm_prompts, 4, args.device)

    results = []
    for k in [int(x) for x in args.ks.split(",")]:
        trunk, prompts = make_prompts(k, args.trunk_len, args.branch_len, vocab)
        produced = k * args.new_tokens
        best: dict[str, float] = {}
        outputs: dict[str, Any] = {}
        methods: dict[str, Callable[[], Any]] = {
            "parallel": functools.partial(run_parallel, model, trunk, prompts, args.new_tokens),
            "separate": functools.partial(run_separate, model, trunk, prompts, args.new_tokens),
            "hf-batched": functools.partial(run_hf, model, trunk, prompts, args.new_tokens, args.device),
        }
        # Methods take turns within each repeat, so a burst of load on a shared machine hits all of them.
        for _ in range(args.repeats):
            for name, fn in methods.items():
                seconds, outputs[name] = timed(fn, args.device, clock)
                best[name] = min(best.get(name, float("inf")), seconds)
        parallel_cache = outputs["parallel"].cache_tokens
        hf_cache = k * (args.trunk_len + max(len(p) for p in prompts) + args.new_tokens - 1)
        separate_cache = max(r.cache_tokens for r in outputs["separate"])
        results.append(
            {
                "k": k,
                "tokens": produced,
                "seconds": best,
                "tokens_per_second": {name: produced / s for name, s in best.items()},
                "speedup_vs_separate": best["separate"] / best["parallel"],
                "speedup_vs_hf_batched": best["hf-batched"] / best["parallel"],
                "kv_cache_tokens": {
                    "parallel": parallel_cache,
                    "hf-batched": hf_cache,
                    "separate": separate_cache,
                },
                "kv_cache_bytes": {
                    "parallel": kv_cache_bytes(model.config, parallel_cache, dtype),
                    "hf-batched": kv_cache_bytes(model.config, hf_cache, dtype),
                    "separate": kv_cache_bytes(model.config, separate_cache, dtype),
                },
            }
        )

    table = Table(title=f"tokens/s (best of {args.repeats}); speedup of parallel; KV cache")
    for column in ("K", "parallel", "separate", "hf-batched", "x separate", "x hf", "KV parallel", "KV hf"):
        table.add_column(column, justify="right")
    for r in results:
        tps = r["tokens_per_second"]
        kv = r["kv_cache_bytes"]
        table.add_row(
            str(r["k"]),
            f"{tps['parallel']:.1f}",
            f"{tps['separate']:.1f}",
            f"{tps['hf-batched']:.1f}",
            f"{r['speedup_vs_separate']:.2f}",
            f"{r['speedup_vs_hf_batched']:.2f}",
            f"{kv['parallel'] / 2**20:.2f} MiB",
            f"{kv['hf-batched'] / 2**20:.2f} MiB",
        )
    console.print(table)
    if args.out is not None:
        environment = {
            "device": args.device,
            "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "clock": args.clock,
            "torch": torch.__version__,
            "model_shape": args.model_shape,
            "params": params,
            "dtype": str(dtype),
            "attn": args.attn,
            "trunk_len": args.trunk_len,
            "branch_len": args.branch_len,
            "new_tokens": args.new_tokens,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": environment, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
