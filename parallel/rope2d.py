"""2D RoPE for HuggingFace causal LMs, without state that outlives a forward call.

The contract (docs/layout.md "Coordinates") rotates some rotary frequency pairs by the branch position
``branch_id * stride`` and the rest by the time position ``time_id``. We patch only the model's
rotary embedding module(s). The two positions travel together inside the ordinary ``[B, L]``
int64 ``position_ids`` that transformers already passes to the rotary module::

    position_ids = branch_position * TIME_SPAN + time_position

The wrapper decodes them, calls the ORIGINAL rotary once per coordinate (so the model's own
rope_type, ``attention_scaling``, dynamic/longrope updates and partial rotary dim stay intact)
and takes each pair's cos/sin from one call or the other. Nothing is stored between calls.

Plain 1D ``position_ids`` (every value below ``TIME_SPAN``, e.g. from ``generate`` or a model
call without positions) decode to branch position 0: the documented 1D default treats the
sequence as branch 0 of a row without trunk, time = position. At ratio 0 that is exactly the
unpatched model; at ratio > 0 the branch pairs rotate by 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from parallel.errors import PloraError
from parallel.layout import DEFAULT_ROPE_2D_RATIO, DEFAULT_STRIDE, branch_pair_indices, rope_positions

# Time positions must stay below this; a power of two so decoding is exact and cheap.
TIME_SPAN = 2**20
CONFIG_KEY = "plora_rope2d"  # model.config attribute, so save_pretrained records the patch


class Rope2DError(PloraError):
    """The model cannot be given 2D RoPE (no rotary module, unknown layout, conflicting patch)."""


@dataclass(frozen=True)
class Rope2DConfig:
    """How a model was patched. ``pair_indices`` are 1-based, as in the original guide."""

    ratio: float
    stride: int
    pair_indices: tuple[int, ...]
    num_pairs: int

    def to_json(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "stride": self.stride,
            "pair_indices": list(self.pair_indices),
            "num_pairs": self.num_pairs,
        }

    @staticmethod
    def from_json(obj: dict[str, Any]) -> Rope2DConfig:
        return Rope2DConfig(
            ratio=float(obj["ratio"]),
            stride=int(obj["stride"]),
            pair_indices=tuple(int(i) for i in obj["pair_indices"]),
            num_pairs=int(obj["num_pairs"]),
        )


def encode_positions(branch_id: torch.Tensor, time_id: torch.Tensor, stride: int) -> torch.Tensor:
    """The int64 ``position_ids`` carrying both RoPE coordinates of each token (same shape)."""
    if stride < 0:
        raise ValueError(f"stride must be >= 0, got {stride}")
    time = time_id.long()
    if time.numel() and (int(time.min()) < 0 or int(time.max()) >= TIME_SPAN):
        raise ValueError(f"time_id must lie in 0..{TIME_SPAN - 1} for 2D RoPE")
    if branch_id.numel() and int(branch_id.min()) < 0:
        raise ValueError("branch_id must be >= 0")
    branch_position, time_position = rope_positions(branch_id.long(), time, stride)
    return branch_position * TIME_SPAN + time_position


def position_overflow(
    model: nn.Module, max_branch_id: int, max_time_id: int, stride: int
) -> tuple[str, int, int] | None:
    """The first RoPE coordinate past the model's ``max_position_embeddings``: ``("branch" | "time",
    position, limit)``, or None when every position fits (or the model states no limit)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return None
    branch_position, time_position = rope_positions(max_branch_id, max_time_id, stride)
    if branch_position >= limit:
        return "branch", branch_position, limit
    if time_position >= limit:
        return "time", time_position, limit
    return None


def decode_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(branch position, time position) from encoded ``position_ids``; 1D positions give branch 0."""
    position_ids = position_ids.long()
    return position_ids // TIME_SPAN, position_ids % TIME_SPAN


class Rope2DEmbedding(nn.Module):
    """Wraps one HF rotary embedding; returns (cos, sin) mixing branch and time positions."""

    def __init__(self, rotary: nn.Module, branch_dims: torch.Tensor, config: Rope2DConfig) -> None:
        super().__init__()
        self.rotary = rotary
        self.plora = config
        # [rotary_dim] bool: True where the cos/sin entry belongs to a branch pair.
        self.register_buffer("branch_dims", branch_dims, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        branch_pos, time_pos = decode_positions(position_ids)
        cos_t, sin_t = self.rotary(x, time_pos, *args, **kwargs)
        if not self.plora.pair_indices:
            return cos_t, sin_t
        with _state_kept(self.rotary):
            cos_b, sin_b = self.rotary(x, branch_pos, *args, **kwargs)
        dims = self.branch_dims.to(cos_t.device)
        return torch.where(dims, cos_b, cos_t), torch.where(dims, sin_b, sin_t)


def _updates_itself(rotary: nn.Module) -> bool:
    """Whether the rotary recomputes its frequencies from each call's positions (dynamic NTK, longrope)."""
    rope_type = getattr(rotary, "rope_type", "default")
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    return any("dynamic" in t or t == "longrope" for t in types)


@contextlib.contextmanager
def _state_kept(rotary: nn.Module) -> Iterator[None]:
    """Undo what a call does to a self-updating rotary's frequencies, so that the branch positions
    (branch_id * stride, far beyond any sequence length) never leak into the time rotation of this
    or a later call: after the forward the rotary is as an unpatched model would have left it."""
    if not _updates_itself(rotary):
        yield
        return
    attributes = {k: v for k, v in vars(rotary).items() if not k.startswith("_")}
    buffers = {k: None if v is None else v.clone() for k, v in rotary._buffers.items()}
    try:
        yield
    finally:
        for name in set(rotary._buffers) - set(buffers):
            del rotary._buffers[name]
        for name, saved in buffers.items():
            current = rotary._buffers.get(name)
            if current is not None and saved is not None and current.shape == saved.shape:
                current.copy_(saved)  # in place: the buffer keeps its address (CUDA graphs replay from it)
            else:
                rotary._buffers[name] = saved
        for name in [k for k in vars(rotary) if not k.startswith("_") and k not in attributes]:
            delattr(rotary, name)
        rotary.__dict__.update(attributes)


def _architecture(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} (model_type={model_type!r})"


def find_rotary_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The unpatched rotary embedding modules of a HF model (those holding ``inv_freq``)."""
    wrapped = {id(m.rotary) for m in model.modules() if isinstance(m, Rope2DEmbedding)}
    return [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "inv_freq")
        and not isinstance(module, Rope2DEmbedding)
        and id(module) not in wrapped
    ]


def _rotary_layout(rotary: nn.Module, arch: str) -> tuple[int, str]:
    """(number of frequency pairs, "half" | "interleaved") from one probe call at position 1.

    HF's usual ``rotate_half`` layout puts pair i at dims i and i + n; a few models interleave
    (pair i at 2i, 2i+1). The probe reads the rotary's real output dim, so partial rotary
    (e.g. ``partial_rotary_factor``) is handled.
    """
    inv_freq = rotary.inv_freq
    probe = torch.zeros(1, dtype=torch.float32, device=inv_freq.device)
    with torch.no_grad():
        out = rotary(probe, torch.ones(1, 1, dtype=torch.long, device=inv_freq.device))
    if not (isinstance(out, tuple) and len(out) == 2 and out[0].ndim >= 1 and out[0].shape[-1] % 2 == 0):
        raise Rope2DError(f"cannot apply 2D RoPE to {arch}: its rotary module does not return (cos, sin)")
    cos = out[0].reshape(-1)
    n = cos.shape[0] // 2
    if torch.equal(cos[:n], cos[n:]):
        return n, "half"
    if torch.equal(cos[0::2], cos[1::2]):
        return n, "interleaved"
    raise Rope2DError(f"cannot apply 2D RoPE to {arch}: unknown rotary cos/sin layout")


def _branch_dims(num_pairs: int, layout: str, pairs: Sequence[int]) -> torch.Tensor:
    per_pair = torch.zeros(num_pairs, dtype=torch.bool)
    per_pair[[i - 1 for i in pairs]] = True
    if layout == "half":
        return torch.cat([per_pair, per_pair])
    return per_pair.repeat_interleave(2)


def _rotaries_or_error(model: nn.Module) -> list[tuple[str, nn.Module, int, str]]:
    arch = _architecture(model)
    rotaries = find_rotary_modules(model)
    if not rotaries:
        raise Rope2DError(
            f"cannot apply 2D RoPE to {arch}: no rotary embedding module (one with inv_freq) found; "
            "plora needs a RoPE-based causal LM"
        )
    described = [(name, mod, *_rotary_layout(mod, arch)) for name, mod in rotaries]
    if len({n for _, _, n, _ in described}) != 1:
        raise Rope2DError(f"cannot apply 2D RoPE to {arch}: its rotary modules differ in size")
    return described


def auto_pair_indices(model: nn.Module, ratio: float = DEFAULT_ROPE_2D_RATIO) -> list[int]:
    """1-based indices of the branch pairs for ``ratio`` (the lowest frequencies, i.e. the last pairs)."""
    existing = rope2d_config(model)
    num_pairs = existing.num_pairs if existing else _rotaries_or_error(model)[0][2]
    return branch_pair_indices(num_pairs, ratio)


def rope2d_config(model: nn.Module) -> Rope2DConfig | None:
    """The 2D RoPE patch of a model (found on its wrapped rotary modules), or None if unpatched."""
    for module in model.modules():
        if isinstance(module, Rope2DEmbedding):
            return module.plora
    return None


def model_stride(model: nn.Module) -> int:
    """The branch stride of the model's 2D RoPE; 0 for an unpatched model (its RoPE knows only time)."""
    patched = rope2d_config(model)
    return patched.stride if patched is not None else 0


def patch_model_2d_rope(
    model: nn.Module,
    *,
    ratio: float = DEFAULT_ROPE_2D_RATIO,
    stride: int = DEFAULT_STRIDE,
    pair_indices: Sequence[int] | None = None,
) -> Rope2DConfig:
    """Give ``model`` 2D RoPE in place: wrap each rotary embedding module.

    Explicit ``pair_indices`` (1-based) override ``ratio``. Patching again with the same
    settings is a no-op; with different ones it is an error (patch a freshly loaded model).
    The settings are also written to ``model.config.plora_rope2d`` so a saved config records them.
    """
    if stride < 0:
        raise ValueError(f"stride must be >= 0, got {stride}")
    existing = rope2d_config(model)
    rotaries = [] if existing else _rotaries_or_error(model)  # probed once: each probe runs the rotary
    num_pairs = existing.num_pairs if existing else rotaries[0][2]
    pairs = tuple(branch_pair_indices(num_pairs, ratio, pair_indices))
    if pair_indices is not None:
        ratio = len(pairs) / num_pairs
    config = Rope2DConfig(ratio=float(ratio), stride=int(stride), pair_indices=pairs, num_pairs=num_pairs)
    if existing is not None:
        if existing.pair_indices == config.pair_indices and existing.stride == config.stride:
            return existing
        raise Rope2DError(
            f"{_architecture(model)} already has 2D RoPE with pairs {list(existing.pair_indices)} and stride "
            f"{existing.stride}; load a fresh model to patch it differently"
        )
    for name, rotary, _, layout in rotaries:
        wrapper = Rope2DEmbedding(rotary, _branch_dims(num_pairs, layout, pairs), config)
        wrapper.to(device=rotary.inv_freq.device)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper)
    model_config = getattr(model, "config", None)
    if model_config is not None:
        setattr(model_config, CONFIG_KEY, config.to_json())
    return config


def restore_2d_rope(model: nn.Module) -> Rope2DConfig | None:
    """Re-apply the 2D RoPE recorded in ``model.config.plora_rope2d`` (e.g. after from_pretrained).

    Returns the patch, or None when the config records none. Already patched: checked, not re-wrapped.
    """
    recorded = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if recorded is None:
        return rope2d_config(model)
    saved = Rope2DConfig.from_json(recorded)
    config = patch_model_2d_rope(model, stride=saved.stride, pair_indices=saved.pair_indices)
    if config.num_pairs != saved.num_pairs:
        raise Rope2DError(
            f"{_architecture(model)} has {config.num_pairs} rotary pairs, but its config records a 2D RoPE "
            f"patch for {saved.num_pairs}"
        )
    return config
