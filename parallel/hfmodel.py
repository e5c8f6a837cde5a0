"""Loading HuggingFace causal LMs and PEFT adapters the way plora needs them (safetensors only, the
attention implementation its masks need), and the dtype names its options accept."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallel.dtypes import DTYPES
from parallel.errors import PloraError, first_line
from parallel.forward import resolve_attn
from parallel.pretrained import load_pretrained

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}


def load_causal_lm(
    name: str,
    *,
    what: str,
    dtype: torch.dtype,
    attn: str,
    device: torch.device | str,
    trust_remote_code: bool,
    config: Any = None,
    weights_on: torch.device | str | None = None,
) -> nn.Module:
    """A causal LM (a local directory or a hub id) with the attention implementation plora's masks
    need (for ``device``), weights from safetensors only; for training and inference alike. ``config``
    replaces the directory's config.json (an export's, whose model type only plora knows).

    The weights go to ``weights_on`` (default ``device``): ``"meta"`` builds the structure alone, no
    weight read or allocated (FSDP's ranks other than 0, which receive their shards from rank 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415 - slow import
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    place = torch.device(weights_on if weights_on is not None else device)
    attn_implementation = resolve_attn(attn, device)
    if place.type == "meta":
        if config is None:
            config = load_pretrained(AutoConfig, name, what=what, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
    model = load_pretrained(
        AutoModelForCausalLM,
        name,
        what=what,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        config=config,
    )
    return model.to(place)


def load_adapter(model: nn.Module, adapter_dir: Path, *, trainable: bool) -> nn.Module:
    """The PEFT adapter in ``adapter_dir`` on ``model``; safetensors only (never a pickled .bin)."""
    from peft import PeftModel  # noqa: PLC0415 - slow import, only when loading

    if not (adapter_dir / "adapter_config.json").is_file():
        raise PloraError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        found = " (it has adapter_model.bin)" if (adapter_dir / "adapter_model.bin").exists() else ""
        raise PloraError(
            f"{adapter_dir}: no adapter_model.safetensors{found}; plora loads safetensors adapters only"
        )
    try:
        with quiet_peft():
            return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise PloraError(
            f"{adapter_dir}: the adapter does not fit this base model: {first_line(err)}"
        ) from None


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft probes a deprecated transformers property; not ours to fix, and not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
