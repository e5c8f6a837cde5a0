"""Benchmark: torch's ``F.linear`` vs the weight-major product decode steps use on CPU.

For each weight of a Qwen2.5-0.5B layer and its output layer, and for 1 to 256 rows (a decode step
feeds one row per branch), times ``F.linear(x, W)`` and ``(W @ x.T).T`` (parallel.skinny_linear)
in the same process, alternating, best of --repeats, and prints the ratio. Random weights.

    python -m bench.skinny_linear
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.shapes import QWEN2_5_0_5B
from parallel.skinny_linear import SKINNY_ROWS, linear_weight_major


def best_seconds(ways: list[Callable[[], torch.Tensor]], repeats: int, calls: int) -> list[float]:
    """Best time per call of each way; the ways take turns, so a burst of load hits all of them."""
    best = [float("inf")] * len(ways)
    for fn in ways:
        fn()
    for _ in range(repeats):
        for n, fn in enumerate(ways):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[n] = min(best[n], (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,64,128,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    hidden, inner, vocab = (QWEN2_5_0_5B[k] for k in ("hidden_size", "intermediate_size", "vocab_size"))
    shapes = {"mlp up (896->4864)": (inner, hidden), "mlp down (4864->896)": (hidden, inner)}
    shapes["output layer (896->151936)"] = (vocab, hidden)
    print(
        f"bench.skinny_linear: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32; decode steps use weight-major up to {SKINNY_ROWS} rows"
    )
    print(f"{'weight':28} {'rows':>5} {'F.linear us':>12} {'weight-major us':>16} {'speedup':>8}")
    torch.manual_seed(0)
    for name, (out_features, in_features) in shapes.items():
        weight = torch.randn(out_features, in_features)
        calls = max(1, 50_000_000 // weight.numel())  # about 50M weights read per timing, at least one call
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, in_features)
            ways = [lambda: F.linear(x, weight), lambda: linear_weight_major(x, weight, None)]  # noqa: B023
            linear, major = best_seconds(ways, args.repeats, calls)
            print(f"{name:28} {rows:>5} {linear * 1e6:>12.0f} {major * 1e6:>16.0f} {linear / major:>7.2f}x")


if __name__ == "__main__":
    main()
