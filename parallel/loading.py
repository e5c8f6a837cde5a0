"""Load a model for parallel generation exactly as it was trained, and export it self-contained.

:func:`load_parallel_model` rebuilds everything from the adapter's ``plora.json`` (written by
``plora train``, see trainer/checkpoint.py): the 2D RoPE patch (stride and pair indices), the mask
mode and the alignment, so the user never repeats those numbers. Before anything is trusted, the
base model is checked against what the adapter was trained on: tokenizer identity, rotary size and,
where plora.json records them (``model``), architecture and sizes. It loads three kinds of directory:

- a base model (a local directory or a hub id, see parallel.pretrained) plus an adapter
  directory (PEFT files + plora.json);
- an exported directory (``plora export``): weights, tokenizer and plora.json in one place, the
  adapter merged in or kept beside the base weights in ``adapter/``;
- a bare base model with no adapter: 2D RoPE at the given ratio/stride, for comparison.

Weights are read from safetensors only; trust_remote_code stays off unless asked.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from parallel import atomic, outdir
from parallel.adaptermeta import PLORA_JSON, AdapterMeta, ExportInfo
from parallel.errors import PloraError
from parallel.fingerprint import check_same_tokenizer
from parallel.forward import settle_auto_attn
from parallel.generation import PLORA_CONFIG_ATTR
from parallel.hfmodel import TORCH_DTYPES, load_adapter, load_causal_lm
from parallel.layout import DEFAULT_ROPE_2D_RATIO, DEFAULT_STRIDE
from parallel.pretrained import resolve_pretrained
from parallel.rope2d import patch_model_2d_rope, restore_2d_rope
from parallel.tokenizer import load_tokenizer

EXPORT_ADAPTER_DIR = "adapter"
# An export's config.json names the model type "plora-<type>", which plain transformers (and vLLM)
# refuse with a message naming it: loaded as an ordinary model, without plora's 2D RoPE, the weights
# would give wrong outputs without a word. The real type is kept beside it for plora's own loader.
EXPORT_MODEL_TYPE_PREFIX = "plora-"
REAL_MODEL_TYPE_KEY = "plora_model_type"
# What plora.json's ``model`` records of the base an adapter was trained on; a base model given at
# load time must match every fact recorded.
MODEL_FACTS: tuple[str, ...] = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


def model_facts(model: torch.nn.Module) -> dict[str, Any]:
    """Architecture and sizes of a model (its language model's, for a multimodal config), as
    recorded in plora.json's ``model``."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = {key: getattr(text, key, None) for key in MODEL_FACTS}
    architectures = getattr(config, "architectures", None)
    return {
        **sizes,
        "model_type": config.model_type,
        "architectures": list(architectures) if architectures else None,
    }


def _is_plora_dir(path: Path) -> bool:
    return (path / PLORA_JSON).is_file()


def _is_export(path: Path) -> bool:
    return _is_plora_dir(path) and AdapterMeta.read(path).export is not None


def _resolve_base(base_model: str | Path | None, config: AdapterMeta) -> str:
    """The base model (absolute directory or hub id): the one given, or the one plora.json records."""
    if base_model is not None:
        return resolve_pretrained(base_model, what="base model").name
    if not config.base_model:
        raise PloraError(f"{config.source}: plora.json records no base model; pass --base-model")
    try:
        return resolve_pretrained(config.base_model, what="base model").name
    except PloraError:
        raise PloraError(
            f"{config.source}: its base model {config.base_model} (from plora.json) is not a directory here; "
            "pass --base-model"
        ) from None


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    """transformers warns that an export's "plora-" model type is unknown to it: expected, not news."""
    from transformers.utils import logging as hf_logging  # noqa: PLC0415 - slow import

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _seal_export_config(directory: Path) -> None:
    """Rename the model type in an export's config.json so that only plora loads it (see above)."""
    path = directory / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config[REAL_MODEL_TYPE_KEY] = config["model_type"]
    config["model_type"] = EXPORT_MODEL_TYPE_PREFIX + config["model_type"]
    atomic.write_json(path, config)


def _export_model_config(directory: str) -> Any:
    """The transformers config of an export, with its real model type."""
    from transformers import CONFIG_MAPPING  # noqa: PLC0415 - slow import

    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PloraError(f"{path}: cannot read the exported model's config ({err})") from None
    if REAL_MODEL_TYPE_KEY not in config:
        raise PloraError(f"{path}: no {REAL_MODEL_TYPE_KEY}; not a config.json written by plora export")
    model_type = config.pop(REAL_MODEL_TYPE_KEY)
    if model_type not in CONFIG_MAPPING:
        raise PloraError(f"{path}: model type {model_type!r} is unknown to this transformers")
    config["model_type"] = model_type
    return CONFIG_MAPPING[model_type].from_dict(config)


def check_dtype(dtype: str) -> None:
    if dtype not in TORCH_DTYPES:
        raise PloraError(f"--dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")


def _load_weights(
    name: str, *, dtype: str, device: str, attn: str, trust_remote_code: bool, config: Any = None
) -> Any:
    check_dtype(dtype)
    return load_causal_lm(
        name,
        what="model",
        dtype=TORCH_DTYPES[dtype],
        attn=attn,
        device=device,
        trust_remote_code=trust_remote_code,
        config=config,
    ).eval()


def check_adapter_fits(
    config: AdapterMeta, model: torch.nn.Module, tokenizer: Any, *, base: str, against: str
) -> None:
    """Refuse an adapter on a base model other than its own: the tokenizer (``tokenizer``: a loaded
    one or a recorded identity, described by ``against``), the architecture and the sizes must be what
    plora.json records. Every path that puts an adapter on a base calls this: generate, export, eval,
    and train's --load-lora and --resume."""
    check_same_tokenizer(
        config.tokenizer,
        tokenizer,
        what=f"adapter {config.source}",
        against=against,
        fix="load the adapter on its own base model",
    )
    _check_facts(model, config, base)


def _check_facts(model: torch.nn.Module, config: AdapterMeta, base: str) -> None:
    """The base given must be the architecture, and have the sizes, that plora.json records (a fact
    recorded as null is one the base's config did not state)."""
    recorded = config.model
    have = model_facts(model)
    for key in MODEL_FACTS:
        if recorded.get(key) is not None and recorded[key] != have[key]:
            raise PloraError(
                f"{base}: {key} is {have[key]!r}, but the adapter {config.source} was trained on a base with "
                f"{recorded[key]!r}; load it on its own base model"
            )


def _apply_rope(model: torch.nn.Module, config: AdapterMeta, base: str) -> None:
    if not config.patch_rope:
        return
    rope = patch_model_2d_rope(model, stride=config.stride, pair_indices=config.pair_indices)
    if config.num_pairs is not None and rope.num_pairs != config.num_pairs:
        raise PloraError(
            f"{base}: its RoPE has {rope.num_pairs} frequency pairs, but the adapter {config.source} was "
            f"trained with {config.num_pairs}; load it on its own base model"
        )


def load_parallel_model(
    base_model: str | Path | None,
    adapter_dir: str | Path | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    attn: str = "sdpa",
    trust_remote_code: bool = False,
    ratio: float = DEFAULT_ROPE_2D_RATIO,
    stride: int = DEFAULT_STRIDE,
    mask: str | None = None,
) -> tuple[Any, Any, AdapterMeta | None]:
    """(model, tokenizer, adapter config) ready for :func:`parallel.generation.generate`.

    ``base_model`` may be None when plora.json names it; an exported model loads as ``base_model``
    alone (or as ``adapter_dir`` with no base). ``ratio``/``stride`` apply only to a bare
    base model (no adapter, not an export); an adapter's own settings always win. The returned
    model carries the adapter config as ``model.plora_config`` so generation uses its mask and align.
    ``mask`` (default: the adapter's, else isolated) is what ``attn="auto"`` is settled for
    (:func:`parallel.forward.settle_auto_attn`).
    """
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise PloraError(f"{adapter_dir}: no such adapter directory")
    if adapter_dir is not None and base_model is None and _is_export(Path(adapter_dir)):
        base_model, adapter_dir = adapter_dir, None  # an exported model given where an adapter goes
    if adapter_dir is not None:
        adapter = Path(adapter_dir)
        config = AdapterMeta.read(adapter)
        if config.export is not None:
            raise PloraError(f"{adapter}: an exported model, not an adapter; load it without a base model")
        base = _resolve_base(base_model, config)
        weights_dir: Path | None = adapter
    elif base_model is not None and _is_plora_dir(Path(base_model)):
        base = resolve_pretrained(base_model, what="model").name
        config = AdapterMeta.read(base)
        if config.export is None:
            raise PloraError(f"{base_model}: an adapter directory, not a model; pass it as the adapter")
        adapter_name = config.export.adapter
        weights_dir = Path(base) / adapter_name if adapter_name else None
    elif base_model is not None:
        base, config, weights_dir = resolve_pretrained(base_model, what="model").name, None, None
    else:
        raise PloraError("give a base model, an adapter directory or an exported model directory")

    exported = config is not None and config.export is not None
    with _transformers_errors_only() if exported else contextlib.nullcontext():
        tokenizer = load_tokenizer(base)
    model = _load_weights(
        base,
        dtype=dtype,
        device=device,
        attn=attn,
        trust_remote_code=trust_remote_code,
        config=_export_model_config(base) if exported else None,
    )
    settle_auto_attn(model, attn, mask or (config.mask if config is not None else "isolated"))
    if config is None:
        patch_model_2d_rope(model, ratio=ratio, stride=stride)
        return model, tokenizer, None
    check_adapter_fits(config, model, tokenizer, base=base, against=f"the tokenizer of {base}")
    if exported:
        restore_2d_rope(model)  # the exported config.json records the patch
    _apply_rope(model, config, base)
    if weights_dir is not None:
        model = load_adapter(model, weights_dir, trainable=False).eval()
    setattr(model, PLORA_CONFIG_ATTR, config)
    return model, tokenizer, config


def export_model(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    merge: bool = False,
    base_model: str | Path | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a self-contained model directory that :func:`load_parallel_model` loads on its own.

    With ``merge`` the LoRA weights are folded into the base weights; without, the base weights
    and the adapter (in ``adapter/``) are kept apart. The 2D RoPE patch is recorded in config.json
    and plora.json. Built under a temporary name beside the (symlink-followed) ``out_dir`` and renamed
    into place: a non-empty ``out_dir`` is refused unless ``overwrite``, and even then it is only
    replaced once the new model is whole. ``out_dir`` may never be the adapter, the base model, the
    working directory or the home directory, nor hold or lie inside one of them.
    """
    out = Path(out_dir)
    outdir.refuse_protected(out, "--out", [("the adapter", adapter_dir), ("the base model", base_model)])
    with outdir.lock(out, "--out"):
        outdir.refuse_foreign(out, "--out", overwrite, is_own=lambda _: False)
        model, tokenizer, config = load_parallel_model(
            base_model, adapter_dir, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code
        )
        assert config is not None
        if config.export is not None:
            raise PloraError(f"{adapter_dir}: already an exported model")
        source_base = _resolve_base(base_model, config)
        outdir.refuse_protected(out, "--out", [("the base model", source_base)])  # the one plora.json names
        target = outdir.real_target(out)
        tmp = atomic.make_temp_dir(target)
        try:
            _write_export(tmp, model, tokenizer, config, merge, dtype, Path(adapter_dir), source_base)
            # Without --overwrite, what appeared in --out while the model was being written is kept.
            atomic.publish_dir(tmp, target, replace=overwrite)
        except (OSError, SafetensorError) as err:
            raise outdir.write_failure(out, "the exported model", err) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_export(
    tmp: Path,
    model: Any,
    tokenizer: Any,
    config: AdapterMeta,
    merge: bool,
    dtype: str,
    adapter_dir: Path,
    source_base: str,
) -> None:
    if merge:
        base = model.merge_and_unload()
    else:
        model.save_pretrained(str(tmp / EXPORT_ADAPTER_DIR), safe_serialization=True)
        base = model.unload()
    base.save_pretrained(str(tmp), safe_serialization=True)
    _seal_export_config(tmp)
    tokenizer.save_pretrained(str(tmp))
    export = ExportInfo(
        merged=merge,
        adapter=None if merge else EXPORT_ADAPTER_DIR,
        source_adapter=str(adapter_dir.resolve()),
        source_base_model=source_base,
        dtype=dtype,
    )
    replace(config, base_model=None, model=model_facts(base), export=export).write(tmp)
