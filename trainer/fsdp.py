"""FSDP2 (``--fsdp``): each process keeps 1/world_size of every weight, frozen base and LoRA alike.

``fully_shard`` goes on each decoder layer, then on the loss module (the root: embeddings, final norm,
output head). A layer's weights are all-gathered just before it runs and freed after, in forward and
again in backward, so a rank holds its shards plus about one layer in full. Gradients are
reduce-scattered: each rank keeps the gradient and the AdamW moments of its own shard.

Mixed precision stays autocast, as with DDP: FSDP all-gathers the weights in their stored dtype (the
training dtype for the frozen base on CUDA, float32 for the LoRA weights; FSDP requires one dtype only
among the trainable ones) and autocast casts them for the matmuls. No MixedPrecisionPolicy, so the
numerics are the same as one process's.

Checkpoints stay what a one-process run writes: every rank takes part in gathering the LoRA weights
and the AdamW moments to full tensors (:func:`gather_checkpoint`), rank 0 writes them, and a resumed
run cuts each full tensor back to this rank's shard (:func:`trainer.checkpoint.shard_like`). The
frozen base is never gathered whole.

Every forward is collective: validation makes each rank run as many as the busiest one
(:func:`trainer.evaluate.join_validation`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from parallel.errors import PloraError
from trainer.checkpoint import CheckpointTensors


def shard_model(loss_module: nn.Module, model: nn.Module, world_size: int, device: torch.device) -> None:
    """Shard ``loss_module`` (which holds ``model``) in place: each decoder layer, then the root."""
    mesh = init_device_mesh(device.type, (world_size,))
    layers = decoder_layers(model)
    if not layers:
        raise PloraError(
            f"--fsdp: found no decoder layers in {type(model).__name__} (its _no_split_modules); "
            "train it with DDP (no --fsdp)"
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(loss_module, mesh=mesh)
    # Validation calls token_losses, not forward: it must gather the root's weights too.
    register_fsdp_forward_method(loss_module, "token_losses")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers: modules of the classes HF keeps whole when it splits a model over devices."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def gather_checkpoint(
    module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer
) -> CheckpointTensors:
    """What :func:`~trainer.checkpoint.save_checkpoint` writes; collective under FSDP (every rank must
    call it, rank 0 writes), the live state otherwise."""
    if not is_sharded(module):
        return CheckpointTensors(None, optimizer.state_dict())
    return CheckpointTensors(full_adapter_state(model), full_optimizer_state(optimizer))


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights as full CPU tensors, by their state-dict names; every rank must call.

    Only these: torch's get_model_state_dict(ignore_frozen_params=True) would also gather a tied
    output head, a whole embedding matrix that the adapter file never holds."""
    return {name: _full(p.detach()).cpu() for name, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded moment gathered to a full tensor; every rank must
    call (the gathers go in the optimizer's own parameter order, the same on every rank)."""
    state_dict = optimizer.state_dict()
    state = {
        index: {name: _full(value) for name, value in per_param.items()}
        for index, per_param in state_dict["state"].items()
    }
    return {"state": state, "param_groups": state_dict["param_groups"]}


def _full(value: Any) -> Any:
    return value.full_tensor() if isinstance(value, DTensor) else value
