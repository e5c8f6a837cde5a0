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

Loading: only rank 0 reads the base, into CPU memory (:func:`load_base_for_sharding`); every other
rank builds the same model on the ``meta`` device (no weights) and takes rank 0's non-persistent
buffers (rotary ``inv_freq``), which no state dict carries. The 2D RoPE patch and LoRA go on as
usual, then every rank shards the empty structure, allocates its shards on its device and receives
them from rank 0 (:func:`shard_model`). So no rank but 0 ever holds a full weight, and rank 0 only
in CPU memory.

Every forward is collective: validation makes each rank run as many as the busiest one
(:func:`trainer.evaluate.join_validation`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from parallel.errors import PloraError
from trainer.checkpoint import CheckpointTensors
from trainer.config import TrainConfig
from trainer.model import load_base

if TYPE_CHECKING:
    from trainer.distributed import DistEnv


def require_processes(env: DistEnv) -> None:
    if not env.is_distributed:
        raise PloraError(
            "--fsdp shards the model over the processes torchrun starts, but this is one process; "
            "run it under torchrun --nproc_per_node N (N > 1), or drop --fsdp"
        )


def load_base_for_sharding(cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """The base model to shard: rank 0's weights in CPU memory, the other ranks' on ``meta`` (none);
    every rank holds rank 0's non-persistent buffers (the 2D RoPE patch probes ``inv_freq``)."""
    require_processes(env)
    model = load_base(cfg, env.device, torch.device("cpu" if env.is_main else "meta"))
    if not env.is_main:
        # What tests/test_fsdp.py checks: this rank read no weight.
        print(
            f"plora: rank {env.rank}: {_weight_bytes(model)} bytes of base weights before sharding",
            file=sys.stderr,
        )
    _share_buffers(model, env.is_main)
    return model


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for p in model.parameters() if not p.is_meta)


def _unsaved_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The non-persistent buffers: not in the state dict, so :func:`set_model_state_dict` cannot set them."""
    saved = set(module.state_dict())
    return {name: buffer for name, buffer in module.named_buffers() if name not in saved}


def _set_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, value)


def _share_buffers(module: nn.Module, is_main: bool) -> None:
    """Rank 0's non-persistent buffers on every rank (a few small tensors, on the CPU)."""
    payload = [_unsaved_buffers(module) if is_main else None]
    dist.broadcast_object_list(payload, src=0)
    _set_buffers(module, payload[0])  # type: ignore[arg-type]


def shard_model(loss_module: nn.Module, model: nn.Module, world_size: int, device: torch.device) -> None:
    """Shard ``loss_module`` (which holds ``model``) in place: each decoder layer, then the root; then
    fill the shards from rank 0's full weights (see :func:`load_base_for_sharding`)."""
    mesh = init_device_mesh(device.type, (world_size,))
    layers = decoder_layers(model)
    if not layers:
        raise PloraError(
            f"--fsdp: found no decoder layers in {type(model).__name__} (its _no_split_modules); "
            "train it with DDP (no --fsdp)"
        )
    full = loss_module.state_dict() if dist.get_rank() == 0 else {}
    buffers = _unsaved_buffers(loss_module)  # the same on every rank (_share_buffers, the 2D RoPE patch)
    with _params_swapped():  # rank 0 too: its weights live on in `full`; every rank shards the same nothing
        loss_module.to("meta")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(loss_module, mesh=mesh)
    loss_module.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(loss_module, full, options=options)
    _set_buffers(loss_module, {name: value.to(device) for name, value in buffers.items()})
    # Validation calls token_losses, not forward: it must gather the root's weights too.
    register_fsdp_forward_method(loss_module, "token_losses")


@contextlib.contextmanager
def _params_swapped() -> Iterator[None]:
    """Module conversions swap each parameter's contents in place; the default gives a module a new
    Parameter, which unties the embeddings from a tied output head on rank 0 only (then the ranks
    shard different parameter lists)."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


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
