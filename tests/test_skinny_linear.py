"""Weight-major linear layers for CPU decode steps: the same numbers as F.linear, and only where meant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import tiny_model

from parallel.skinny_linear import SKINNY_ROWS, linear_weight_major, weight_major_linears


@pytest.mark.parametrize("shape", [(1, 16), (3, 16), (2, 5, 16), (SKINNY_ROWS + 1, 16)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_weight_major_product_equals_linear(shape: tuple[int, ...], with_bias: bool) -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(*shape), torch.randn(24, 16)
    bias = torch.randn(24) if with_bias else None
    out = linear_weight_major(x, weight, bias)
    assert out.shape == (*shape[:-1], 24)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


class Offloaded(torch.nn.Linear):
    """A subclass with its own forward, as quantised layers have."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_only_plain_linears_change_and_only_inside() -> None:
    torch.manual_seed(0)
    plain, subclass, hooked = torch.nn.Linear(16, 24), Offloaded(16, 24), torch.nn.Linear(16, 24)
    hook = hooked.forward
    hooked.forward = hook  # an instance-level forward, as accelerate's hooks install
    model = torch.nn.ModuleList([plain, subclass, hooked])
    few, many = torch.randn(4, 16), torch.randn(SKINNY_ROWS + 1, 16)
    with weight_major_linears(model):
        assert "forward" in vars(plain) and "forward" not in vars(subclass)
        assert hooked.forward is hook
        # Few rows go weight-major, a prefill's many rows keep torch's kernel: bit for bit each way.
        assert torch.equal(plain(few), linear_weight_major(few, plain.weight, plain.bias))
        assert torch.equal(plain(many), F.linear(many, plain.weight, plain.bias))
        assert torch.equal(subclass(few), 2 * F.linear(few, subclass.weight, subclass.bias))
    assert "forward" not in vars(plain) and hooked.forward is hook
    assert torch.equal(plain(few), F.linear(few, plain.weight, plain.bias))


def test_restored_after_an_error() -> None:
    layer = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="boom"), weight_major_linears(layer):
        raise RuntimeError("boom")
    assert "forward" not in vars(layer)


def test_model_logits_agree_inside_and_outside() -> None:
    model = tiny_model("qwen2")
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with weight_major_linears(model):
            swapped = model(input_ids=ids).logits
    torch.testing.assert_close(swapped, reference, rtol=1e-4, atol=1e-5)
