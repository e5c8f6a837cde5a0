"""Linear layers for decode steps on CPU: a few rows against a large weight, computed weight-major.

A decode step multiplies one row per branch by every weight matrix of the model. torch's CPU
``F.linear`` computes ``x @ W.T``; with MKL (torch's CPU BLAS) on this project's AMD machine that
costs about one matrix-vector product per row for 2 to 64 rows, so K branches in one forward cost
nearly K single-branch steps and parallel decoding gains little. The same product taken the other
way round, ``(W @ x.T).T``, reads the weight once: for ``Linear(896, 151936)`` (Qwen2.5-0.5B's
output layer) about 66 ms became 12 ms at 2 rows and 63 ms became 14 ms at 4; for ``Linear(896, 4864)``
about 480 us became 300 us at 2 rows. ``bench/skinny_linear.py`` measures both ways on the machine at
hand (latest output in BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch

# More rows (a prefill) keep torch's own kernel, tuned for them on every CPU; here the gain of the
# weight-major way falls from 2-5x at 2-4 rows to 1.1-1.3x from 128 rows.
SKINNY_ROWS = 64


def linear_weight_major(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ x.T).T``."""
    flat = x.reshape(-1, x.shape[-1])
    out = (weight @ flat.T).T
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _skinny_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.numel() // x.shape[-1] > SKINNY_ROWS:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return linear_weight_major(x, self.weight, self.bias)


@contextlib.contextmanager
def weight_major_linears(model: torch.nn.Module) -> Iterator[None]:
    """While inside, the model's plain ``nn.Linear`` layers on CPU take few rows weight-major.

    Only exact ``nn.Linear`` instances are touched: quantised subclasses and layers whose ``forward``
    is already wrapped (accelerate's offload hooks) keep theirs. Nothing changes on other devices.
    """
    linears = [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and "forward" not in vars(m)
    ]
    for module in linears:
        module.forward = types.MethodType(_skinny_forward, module)
    try:
        yield
    finally:
        for module in linears:
            del module.forward
