"""--gradient-checkpointing: the LoRA gradients of a 2D-RoPE, branch-masked model are those without it.

Oracle: the same model without checkpointing. Each layer's recomputation is counted (or the switch
seen), so a test cannot pass by checkpointing nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import cli_args
from typer.testing import CliRunner

import trainer.model
from cli.main import app
from parallel.errors import PloraError
from parallel.rope2d import patch_model_2d_rope
from tests.models import collate, random_row, tiny_model
from trainer.config import TrainConfig
from trainer.model import PackedLoss, add_lora, enable_checkpointing, trainable_parameters

STRIDE = 16


def _loss_module(arch: str, checkpointing: bool) -> PackedLoss:
    model = tiny_model(arch)
    patch_model_2d_rope(model, stride=STRIDE)
    if checkpointing:
        enable_checkpointing(model, arch)
    cfg = TrainConfig(shards="", base_model=arch, lora_rank=4, lora_dropout=0.1)
    torch.manual_seed(0)
    peft_model = add_lora(model, cfg, None)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A without a gradient
        for param in trainable_parameters(peft_model):
            param.normal_(0.0, 0.1)
    return PackedLoss(peft_model.train(), mask="isolated", stride=STRIDE)


def _batches() -> list[dict[str, torch.Tensor]]:
    """Two batches of different shapes, trunks and branch counts."""
    rng = np.random.default_rng(0)
    first = [random_row(rng, 5, [7, 4, 6]), random_row(rng, 0, [3, 9])]
    second = [random_row(rng, 3, [4, 4, 5, 2]), random_row(rng, 6, [8]), random_row(rng, 2, [5, 5])]
    return [collate(first), collate(second)]


def _loss(module: PackedLoss, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    names = ("input_ids", "branch_id", "time_id", "attention_mask", "labels")
    return module(*(batch[n] for n in names))


def _grads(module: PackedLoss) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in trainable_parameters(module.model)]
    module.model.zero_grad(set_to_none=True)
    return grads


def _layer_calls(module: PackedLoss) -> list[int]:
    """A counter of decoder-layer forwards (a recomputation counts as one more)."""
    calls = [0]
    for layer in module.model.get_base_model().model.layers:
        layer.self_attn.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lora_gradients_equal_with_checkpointing(arch: str) -> None:
    plain, checkpointed = _loss_module(arch, False), _loss_module(arch, True)
    calls = _layer_calls(checkpointed)
    layers = len(checkpointed.model.get_base_model().model.layers)
    for batch in _batches():
        torch.manual_seed(1)  # the same dropout masks; checkpointing replays the RNG state
        _loss(plain, batch).backward()
        expected = _grads(plain)
        torch.manual_seed(1)
        calls[0] = 0
        _loss(checkpointed, batch).backward()
        assert calls[0] == 2 * layers  # each layer ran again in backward
        got = _grads(checkpointed)
        assert any(g.abs().max() > 0 for g in got)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_recomputation_sees_its_own_batch(arch: str) -> None:
    """Two forwards, then one backward: the first batch's layers are recomputed after the second
    batch's forward, so positions or a mask kept in module state would give the second batch's."""
    plain, checkpointed = _loss_module(arch, False), _loss_module(arch, True)
    first, second = _batches()
    for module in (plain, checkpointed):
        torch.manual_seed(2)
        (_loss(module, first) + 0.5 * _loss(module, second)).backward()
    for g, e in zip(_grads(checkpointed), _grads(plain), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_unsupported_model_is_one_line_error() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(PloraError, match="base: Linear does not support --gradient-checkpointing"):
        enable_checkpointing(model, "base")


def test_plora_train_flag_turns_it_on(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch reaches the trainer's model (the gradients it gives are checked above)."""
    enabled: list[str] = []
    real = trainer.model.enable_checkpointing

    def spy(model: torch.nn.Module, path: str) -> None:
        enabled.append(path)
        real(model, path)

    monkeypatch.setattr(trainer.model, "enable_checkpointing", spy)
    args = cli_args(train_shards, tiny_model_dir, tmp_path, "--max-steps", "1", "--gradient-checkpointing")
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert enabled == [str(tiny_model_dir)]
    assert (tmp_path / "lora" / "hf_parallel_lora_final" / "adapter_model.safetensors").is_file()
