"""One packed forward for users, evaluation, training and tests: positions and mask built here.

We always hand the model our own 4D mask (a bool tensor or a FlexAttention BlockMask), or for
models with per-layer-type masks (Gemma2, sliding-window Qwen2/3) a dict of them. In
transformers >= 4.56, ``masking_utils._preprocess_mask_arguments`` returns a 4D mask as is
before looking at ``position_ids``, and those models take a dict as the finished per-layer
masks; so transformers' own mask builder, including its packed-sequence detection from
non-monotonic ``position_ids``, never runs. ``position_ids`` stay the ``[B, L]`` int64 tensor
transformers expects; they carry both RoPE coordinates (see parallel.rope2d).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint

from parallel.errors import PloraError
from parallel.layout import IGNORE_INDEX
from parallel.masks import block_mask, dense_mask
from parallel.prefix import IMPLEMENTATION as PREFIX
from parallel.prefix import prefix_mask, register_prefix
from parallel.rope2d import encode_positions, model_stride

ATTN_CHOICES: tuple[str, ...] = ("auto", "flex", "sdpa", "eager", "prefix")
_HF_NAMES = {
    "flex": "flex_attention",
    "flex_attention": "flex_attention",
    "sdpa": "sdpa",
    "eager": "eager",
    "prefix": PREFIX,
    PREFIX: PREFIX,
}


def resolve_attn(attn: str, device: torch.device | str) -> str:
    """The transformers ``attn_implementation`` to load with for ``--attn``: auto = flex on CUDA, sdpa
    elsewhere (on the CPU :func:`settle_auto_attn` may then pick prefix, once the mask is known).

    flash_attention_* cannot take an arbitrary mask, so it is refused rather than silently
    training with plain causal attention.
    """
    if attn == "auto":
        return "flex_attention" if torch.device(device).type == "cuda" else "sdpa"
    if attn not in _HF_NAMES:
        raise PloraError(
            f"unknown attention implementation {attn!r}; expected one of {', '.join(ATTN_CHOICES)}"
        )
    if _HF_NAMES[attn] == PREFIX:
        register_prefix()  # transformers must know the name before a model loads with it
    return _HF_NAMES[attn]


def check_attn_mask(attn: str, mask: str) -> None:
    """Refuse a mask mode the attention backend cannot compute, before anything loads."""
    if _HF_NAMES.get(attn) == PREFIX and mask != "isolated":
        raise PloraError(f"--attn prefix computes isolated rows only, not --mask {mask}; use --attn sdpa")


def check_attn_device(attn: str, device: torch.device | str) -> None:
    """Refuse flex attention on the CPU before anything loads: torch's CPU flex kernel has no backward
    (training) and fails to compile for evaluation batches and for decoding against a KV cache."""
    if _HF_NAMES.get(attn) == "flex_attention" and torch.device(device).type == "cpu":
        raise PloraError("--attn flex needs CUDA; on the CPU use --attn sdpa (or auto)")


def _windowed(config: Any) -> bool:
    """Whether a layer of the model attends through a sliding window (as build_attention_mask applies it)."""
    if getattr(config, "sliding_window", None) is None:
        return False
    layer_types = getattr(config, "layer_types", None)
    return layer_types is None or "sliding_attention" in layer_types


def settle_auto_attn(
    model: torch.nn.Module, attn: str, mask: str, device: torch.device | None = None
) -> None:
    """``--attn auto`` once the model and the mask are known: on the CPU, prefix for isolated rows of a
    model without a sliding window or attention softcapping (faster than dense SDPA at every measured
    point, BENCHMARKS.md); otherwise the model keeps what :func:`resolve_attn` loaded (sdpa; flex on CUDA).
    ``device``: where the model will run, if not where its weights are now (FSDP loads them elsewhere).
    """
    config = model.config
    if attn != "auto" or mask != "isolated" or getattr(config, "_attn_implementation", None) != "sdpa":
        return
    if (device or model.get_input_embeddings().weight.device).type != "cpu":
        return
    if _windowed(config) or getattr(config, "attn_logit_softcapping", None) is not None:
        return
    register_prefix()
    model.set_attn_implementation(PREFIX)


def packs_rows(model: torch.nn.Module, mask: str) -> bool:
    """Whether batches for ``model`` go padding-free (rows end to end, ``row_id``; trainer.data).

    Prefix and flex attention skip what a row cannot see, so joining the rows costs no attention and
    saves the padding's linear layers; a dense mask over the joined batch would cost its whole L^2, so
    sdpa and eager keep padded rows.
    """
    impl = getattr(model.config, "_attn_implementation", None)
    return impl == "flex_attention" or (impl == PREFIX and mask == "isolated")


def _model_attn(model: torch.nn.Module, attn: str | None, device: torch.device) -> str:
    current = getattr(model.config, "_attn_implementation", None) or "eager"
    # auto may have been settled to prefix after loading (settle_auto_attn)
    if attn is not None and attn != "auto" and resolve_attn(attn, device) != current:
        raise PloraError(
            f"model runs {current!r} attention, not {attn!r}; load it with that attn_implementation"
        )
    if current not in ("sdpa", "eager", "flex_attention", PREFIX):
        raise PloraError(
            f"attention implementation {current!r} cannot take plora's mask; use sdpa, eager, flex or prefix"
        )
    return current


def build_attention_mask(
    model: torch.nn.Module,
    branch_id: torch.Tensor,
    time_id: torch.Tensor,
    mode: str,
    valid: torch.Tensor | None,
    attn: str | None = None,
    *,
    num_queries: int | None = None,
    row_id: torch.Tensor | None = None,
) -> Any:
    """What to pass as ``attention_mask``: one mask, or a per-layer-type dict (sliding-window layers).

    ``num_queries``: only the last tokens are queries (KV-cached decoding; see parallel.masks).
    ``row_id``: the row of each token where rows lie end to end (padding-free; see parallel.masks).
    """
    impl = _model_attn(model, attn, branch_id.device)
    config = model.config
    if impl == PREFIX:
        check_attn_mask(PREFIX, mode)

        def build(window: int | None) -> Any:
            if window is not None:
                raise PloraError(
                    f"--attn prefix cannot apply {type(model).__name__}'s sliding window; use --attn sdpa"
                )
            if num_queries is not None:  # KV-cached decoding: the newest tokens against the cache
                return dense_mask(branch_id, time_id, mode, valid, num_queries=num_queries, row_id=row_id)
            return prefix_mask(branch_id, time_id, valid, row_id)

    elif impl == "flex_attention":

        def build(window: int | None) -> Any:
            return block_mask(
                branch_id, time_id, mode, valid, window=window, num_queries=num_queries, row_id=row_id
            )

    else:
        # eager adds the mask to the scores, so it needs the additive form in the model's dtype.
        dtype = model.get_input_embeddings().weight.dtype

        def build(window: int | None) -> Any:
            allowed = dense_mask(
                branch_id, time_id, mode, valid, window=window, num_queries=num_queries, row_id=row_id
            )
            if impl == "sdpa":
                return allowed
            zero = torch.zeros((), dtype=dtype, device=allowed.device)
            return torch.where(allowed, zero, torch.finfo(dtype).min)

    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise PloraError(
                f"layer types {sorted(unknown)} of {type(model).__name__} are not supported by plora"
            )
        if "sliding_attention" in layer_types:
            return {"full_attention": build(None), "sliding_attention": build(window)}
        return build(None)
    # No per-layer types (Llama, Mistral, Phi3): a configured window applies to every layer.
    return build(window)


def packed_model_inputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    branch_id: torch.Tensor,
    time_id: torch.Tensor,
    *,
    mask: str = "isolated",
    stride: int | None = None,
    attention_mask: torch.Tensor | None = None,
    attn: str | None = None,
    row_id: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The keyword arguments (ids, 2D positions, plora mask) that run ``model`` or its decoder on packed rows.

    ``input_ids``, ``branch_id``, ``time_id`` are ``[B, L]`` as stored in the shards;
    ``attention_mask`` ``[B, L]`` (1 = real token, 0 = padding) marks padding. ``stride``
    defaults to the stride the model was patched with, and to 0 for an unpatched model: its
    plain RoPE would rotate by the whole encoded position (branch and time), so there the branch
    is left out and tokens are placed by ``time_id`` alone. ``attn`` only asserts the model's
    attention implementation; the mask kind follows ``model.config._attn_implementation``.
    ``row_id`` ``[B, L]``: several rows lie end to end in each sequence (a padding-free batch,
    trainer.data); no token sees another row's, and positions stay each row's own.
    """
    if input_ids.ndim != 2 or input_ids.shape != branch_id.shape or input_ids.shape != time_id.shape:
        raise ValueError(
            "input_ids, branch_id and time_id must be [B, L] tensors of one shape, got "
            f"{tuple(input_ids.shape)}, {tuple(branch_id.shape)}, {tuple(time_id.shape)}"
        )
    device = input_ids.device
    branch_id = branch_id.to(device)
    time_id = time_id.to(device)
    valid = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
    if stride is None:
        stride = model_stride(model)
    # Padding may hold any coordinates; zero them so they stay in the encodable range.
    if valid is not None:
        branch_id = torch.where(valid, branch_id, 0)
        time_id = torch.where(valid, time_id, 0)
    return {
        "input_ids": input_ids,
        "attention_mask": build_attention_mask(
            model, branch_id, time_id, mask, valid, attn, row_id=None if row_id is None else row_id.to(device)
        ),
        "position_ids": encode_positions(branch_id, time_id, stride),
        "use_cache": False,
    }


def forward_packed(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    branch_id: torch.Tensor,
    time_id: torch.Tensor,
    *,
    mask: str = "isolated",
    stride: int | None = None,
    attention_mask: torch.Tensor | None = None,
    attn: str | None = None,
    row_id: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``[B, L, V]`` of packed rows (arguments as in :func:`packed_model_inputs`).

    No loss here: shard labels are already the next token; training and evaluation use
    :func:`packed_token_losses`, which never builds the full logits.
    """
    inputs = packed_model_inputs(
        model,
        input_ids,
        branch_id,
        time_id,
        mask=mask,
        stride=stride,
        attention_mask=attention_mask,
        attn=attn,
        row_id=row_id,
    )
    return model(**inputs).logits


# Labelled tokens per lm_head + cross-entropy chunk: bounds the transient logits of a step to
# about chunk x vocab floats (2.5 GB in fp32 for a 151936-token vocabulary).
LOSS_CHUNK_TOKENS = 4096


class _CausalLMParts:
    """The decoder body, output head and final logit transform of a causal LM (PEFT-wrapped or not).

    LoRA layers live inside these modules, so running them keeps the adapters active.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = getattr(base, "base_model", None)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if decoder is None or decoder is base or head is None:
            raise PloraError(
                f"{type(base).__name__} has no separate decoder and output head; "
                "plora cannot compute its loss"
            )
        self.decoder = decoder
        self.head = head
        config = base.config
        # The transforms the architectures' own forward applies after lm_head; keep them identical.
        self.softcap = getattr(config, "final_logit_softcapping", None)  # Gemma2/3
        self.scale = getattr(base, "logit_scale", None)  # Cohere
        self.divide = getattr(config, "logits_scaling", None)  # Granite

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.divide is not None:
            logits = logits / self.divide
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def chunk_losses(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.logits(hidden).float(), target, reduction="none")


def packed_token_losses(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    branch_id: torch.Tensor,
    time_id: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: str = "isolated",
    stride: int | None = None,
    attention_mask: torch.Tensor | None = None,
    attn: str | None = None,
    row_id: torch.Tensor | None = None,
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> torch.Tensor:
    """Per-token fp32 cross-entropy ``[B, L]`` of packed rows (0 where the label is IGNORE_INDEX).

    Equal to ``token_losses(forward_packed(...), labels)``, but the output head runs only on the
    hidden states of labelled tokens, ``chunk_tokens`` at a time; with gradients on, each chunk but
    the last is recomputed in backward instead of keeping its logits alive. The last chunk's logits
    are kept: backward starts with them, so recomputing them would hold the same memory at the
    same moment (every activation is still alive) for a second head forward.
    """
    parts = _CausalLMParts(model)
    inputs = packed_model_inputs(
        model,
        input_ids,
        branch_id,
        time_id,
        mask=mask,
        stride=stride,
        attention_mask=attention_mask,
        attn=attn,
        row_id=row_id,
    )
    hidden = parts.decoder(**inputs).last_hidden_state
    target = labels.to(device=hidden.device, dtype=torch.long)
    where = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    picked, picked_target = hidden[where], target[where]
    chunks = []
    # At least one (maybe empty) chunk: a row without labels (a weightless DDP filler) must still
    # reach the graph, so that every process's backward produces the gradients DDP reduces.
    starts = range(0, max(picked.shape[0], 1), chunk_tokens)
    for start in starts:
        piece = (picked[start : start + chunk_tokens], picked_target[start : start + chunk_tokens])
        if torch.is_grad_enabled() and start != starts[-1]:
            chunks.append(torch.utils.checkpoint.checkpoint(parts.chunk_losses, *piece, use_reentrant=False))
        else:
            chunks.append(parts.chunk_losses(*piece))
    losses = torch.zeros(target.shape, dtype=torch.float32, device=hidden.device)
    return losses.index_put(where, torch.cat(chunks))


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy ``[B, L]`` in fp32 (0 where the label is IGNORE_INDEX); no shift."""
    target = labels.to(device=logits.device, dtype=torch.long)
    flat = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        target.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return flat.reshape(target.shape)


def packed_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies in fp32, number of labelled tokens): shard labels are the next token."""
    return token_losses(logits, labels).sum(), (labels != IGNORE_INDEX).sum()
