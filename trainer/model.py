"""The trainable model: base causal LM -> 2D RoPE -> LoRA (PEFT), and the loss module that DDP wraps."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallel.errors import PloraError, first_line
from parallel.forward import packed_token_losses, packs_rows, settle_auto_attn
from parallel.hfmodel import TORCH_DTYPES, load_adapter, load_causal_lm, quiet_peft
from parallel.rope2d import Rope2DConfig, patch_model_2d_rope, position_overflow
from trainer.config import TrainConfig


@dataclass(frozen=True)
class RopeSettings:
    """What inference needs to rebuild the positions: the patch (None = plain 1D RoPE by time) and stride."""

    rope: Rope2DConfig | None

    @property
    def stride(self) -> int:
        # An unpatched model rotates by time only, so the branch must not enter its position ids.
        return self.rope.stride if self.rope is not None else 0


def load_base_model(
    path: str,
    *,
    attn: str,
    device: torch.device,
    dtype: str,
    trust_remote_code: bool = False,
    weights_on: torch.device | None = None,
) -> nn.Module:
    """The base causal LM to train on ``device`` (a local directory or a hub id); its weights go to
    ``weights_on`` (default ``device``; see :func:`parallel.hfmodel.load_causal_lm`).

    Frozen weights are kept in the training dtype on CUDA (memory) and in float32 on CPU (speed and
    exactness); the LoRA weights PEFT adds are float32 either way and autocast does the rest.
    """
    weights_dtype = TORCH_DTYPES[dtype] if device.type == "cuda" else torch.float32
    return load_causal_lm(
        path,
        what="base model",
        dtype=weights_dtype,
        attn=attn,
        device=device,
        trust_remote_code=trust_remote_code,
        weights_on=weights_on,
    )


def check_vocabulary(model: nn.Module, vocab_size: int, path: str) -> None:
    """Every token id of the shards must have an embedding row in the model."""
    rows = model.get_input_embeddings().num_embeddings
    if rows < vocab_size:
        raise PloraError(
            f"{path}: the model embeds {rows} token ids, but the shards' tokenizer has {vocab_size}; "
            "use the base model the shards were tokenized for"
        )


def check_positions(model: nn.Module, max_branch_id: int, max_time_id: int, stride: int, shards: str) -> None:
    """Every RoPE position of the shards must lie inside the model's ``max_position_embeddings``.

    Branch positions are ``branch_id * stride`` (0 for an unpatched model), time positions ``time_id``.
    """
    overflow = position_overflow(model, max_branch_id, max_time_id, stride)
    if overflow is None:
        return
    which, position, limit = overflow
    if which == "branch":
        raise PloraError(
            f"{shards}: branch {max_branch_id} x --stride {stride} = RoPE position {position}, "
            f"beyond the model's max_position_embeddings {limit}; train with a smaller --stride (at most "
            f"{(limit - 1) // max(max_branch_id, 1)}) or fewer branches"
        )
    raise PloraError(
        f"{shards}: time_id reaches {max_time_id}, so {max_time_id + 1} time positions exceed the "
        f"model's max_position_embeddings {limit}; re-tokenize with --max-seq-len at most {limit // 2} "
        "(a trunk and a branch may each be that long)"
    )


def apply_rope(model: nn.Module, cfg: TrainConfig) -> RopeSettings:
    """2D RoPE unless ``--no-patch-rope``; a model without RoPE or an impossible ratio is a one-line error."""
    if not cfg.patch_rope:
        return RopeSettings(None)
    try:
        rope = patch_model_2d_rope(
            model, ratio=cfg.rope_2d_ratio, stride=cfg.stride, pair_indices=cfg.pair_indices
        )
    except ValueError as err:
        raise PloraError(f"{cfg.base_model}: {first_line(err)}") from None
    return RopeSettings(rope)


def load_rope_model(
    cfg: TrainConfig,
    vocab_size: int,
    max_coordinates: tuple[int, int],
    device: torch.device,
    base: nn.Module | None = None,
) -> tuple[nn.Module, RopeSettings]:
    """The base model with 2D RoPE (training and evaluation alike), checked against the shards: every
    token id of their tokenizer (``vocab_size``) has an embedding and every position fits the model.
    ``base``: the base already loaded (FSDP's, :func:`trainer.fsdp.load_base_for_sharding`), else
    loaded on ``device``."""
    model = base if base is not None else load_base(cfg, device)
    settle_auto_attn(model, cfg.attn, cfg.mask, device)
    check_vocabulary(model, vocab_size, cfg.base_model)
    rope = apply_rope(model, cfg)
    check_positions(model, *max_coordinates, rope.stride, cfg.shards)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.base_model)
    return model, rope


def load_base(cfg: TrainConfig, device: torch.device, weights_on: torch.device | None = None) -> nn.Module:
    """``--base-model`` to train on ``device``, its weights on ``weights_on`` (default ``device``)."""
    return load_base_model(
        cfg.base_model,
        attn=cfg.attn,
        device=device,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        weights_on=weights_on,
    )


def enable_checkpointing(model: nn.Module, path: str) -> None:
    """``--gradient-checkpointing``: recompute each decoder layer's activations in backward, not keep them.

    The positions and the mask reach a layer only as arguments of its call (the rotary runs once, before
    the layers, and hands them cos/sin), and non-reentrant checkpointing replays the layer on exactly
    those saved arguments; no module state is read, so recomputation cannot see another batch. Unlike
    reentrant checkpointing it also needs no input that requires grad (LoRA freezes the embeddings).
    Only layers in training mode under autograd recompute: evaluation and generation are unaffected.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise PloraError(f"{path}: {type(model).__name__} does not support --gradient-checkpointing")
    # transformers 5 renamed the method (the old name warns); older versions have only the old one.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def add_lora(model: nn.Module, cfg: TrainConfig, adapter_dir: str | None) -> nn.Module:
    """Wrap ``model`` in PEFT LoRA: fresh (seeded) adapters, or the trainable adapter in ``adapter_dir``."""
    if adapter_dir is not None:
        with warnings.catch_warnings():
            # A base on meta (FSDP, ranks but 0) takes no adapter values: rank 0 sends them when sharding.
            warnings.filterwarnings("ignore", message="for .*: copying from a non-meta parameter")
            return load_adapter(model, Path(adapter_dir), trainable=True)
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - slow import

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.effective_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        with quiet_peft():
            return get_peft_model(model, lora)
    except ValueError as err:
        raise PloraError(f"--lora-targets {cfg.lora_targets!r}: {first_line(err)}") from None


def lora_settings(model: nn.Module) -> dict[str, Any]:
    """The LoRA settings in effect (from the PEFT config: the loaded adapter's, not the command line's)."""
    config = model.peft_config[model.active_adapter]
    targets = config.target_modules
    return {
        "rank": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "targets": targets if isinstance(targets, str) else ",".join(sorted(targets)),
    }


class PackedLoss(nn.Module):
    """Summed cross-entropy of a micro-batch's trained tokens, as one module so DDP sees one forward."""

    def __init__(self, model: nn.Module, *, mask: str, stride: int) -> None:
        super().__init__()
        self.model = model
        self.mask = mask
        self.stride = stride

    @property
    def padding_free(self) -> bool:
        """Whether to collate this model's batches padding-free (trainer.data.RowStore.collate)."""
        return packs_rows(self.model, self.mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        branch_id: torch.Tensor,
        time_id: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        row_id: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.token_losses(input_ids, branch_id, time_id, attention_mask, labels, row_id).sum()

    def token_losses(
        self,
        input_ids: torch.Tensor,
        branch_id: torch.Tensor,
        time_id: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        row_id: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token fp32 cross-entropy ``[B, L]``; logits are only computed at labelled tokens."""
        return packed_token_losses(
            self.model,
            input_ids,
            branch_id,
            time_id,
            labels,
            mask=self.mask,
            stride=self.stride,
            attention_mask=attention_mask,
            row_id=row_id,
        )


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
