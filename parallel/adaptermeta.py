"""plora.json: what an adapter directory records beside PEFT's files so that inference rebuilds the
model it was trained with, and the facts a base model given at load time is checked against.

:class:`AdapterMeta` is the file's one schema: ``plora train`` writes it with every checkpoint,
``plora export`` writes it (with :class:`ExportInfo`) into an exported model, and every reader
(loading, generation, eval, --load-lora, --resume) reads it through :meth:`AdapterMeta.read`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from parallel import atomic
from parallel.errors import PloraError
from parallel.jsonfile import Count, Shape, fields_problem, missing_keys, read_object
from parallel.layout import ALIGN_MODES, MASK_MODES

PLORA_JSON = "plora.json"
ADAPTER_FORMAT = 1

_NONE = type(None)
# Every key of plora.json, in the order it is written, with its JSON type.
_SHAPE: Shape = {
    "format_version": int,
    "plora_version": str,
    "base_model": (str, _NONE),
    "model": dict,
    "tokenizer": dict,
    "special_tokens": dict,
    "patch_rope": bool,
    "rope_2d_ratio": float,
    "pair_indices": list,
    "num_pairs": (Count, _NONE),
    "stride": Count,
    "mask": str,
    "align": str,
    "packing": dict,
    "attn": str,
    "dtype": str,
    "lora": dict,
    "shards": dict,
    "step": Count,
}
_TOKENIZER_SHAPE: Shape = {"version": int, "vocab_size": Count, "vocab_sha256": str}
_EXPORT_SHAPE: Shape = {
    "merged": bool,
    "adapter": (str, _NONE),
    "source_adapter": str,
    "source_base_model": str,
    "dtype": str,
}


@dataclass(frozen=True)
class ExportInfo:
    """What ``plora export`` made of an adapter; ``adapter`` is the subdirectory holding it unmerged."""

    merged: bool
    adapter: str | None
    source_adapter: str
    source_base_model: str
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AdapterMeta:
    """plora.json. ``tokenizer`` is the identity of parallel.fingerprint, ``model`` the base's
    architecture and sizes (parallel.loading.MODEL_FACTS); ``source`` is the directory it was read
    from (None before it is written) and is not part of the file."""

    plora_version: str
    base_model: str | None  # absolute for a local directory, or a hub id; None in an export
    model: dict[str, Any]
    tokenizer: dict[str, Any]
    special_tokens: dict[str, Any]
    patch_rope: bool
    rope_2d_ratio: float
    pair_indices: tuple[int, ...]
    num_pairs: int | None
    stride: int
    mask: str
    align: str
    packing: dict[str, Any]
    attn: str
    dtype: str
    lora: dict[str, Any]
    shards: dict[str, Any]  # {"directory", "digest"} of the shards it was trained on
    step: int
    export: ExportInfo | None = None
    source: Path | None = None

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "format_version": ADAPTER_FORMAT,
            "plora_version": self.plora_version,
            "base_model": self.base_model,
            "model": self.model,
            "tokenizer": self.tokenizer,
            "special_tokens": self.special_tokens,
            "patch_rope": self.patch_rope,
            "rope_2d_ratio": self.rope_2d_ratio,
            "pair_indices": list(self.pair_indices),
            "num_pairs": self.num_pairs,
            "stride": self.stride,
            "mask": self.mask,
            "align": self.align,
            "packing": self.packing,
            "attn": self.attn,
            "dtype": self.dtype,
            "lora": self.lora,
            "shards": self.shards,
            "step": self.step,
        }
        if self.export is not None:
            obj["export"] = self.export.to_json()
        return obj

    def write(self, directory: Path) -> None:
        atomic.write_json(directory / PLORA_JSON, self.to_json())

    @staticmethod
    def read(directory: str | Path) -> AdapterMeta:
        """The plora.json of an adapter or exported model; a one-line error naming the file and the
        key if it is missing, not JSON, or not what this version writes."""
        file = Path(directory) / PLORA_JSON
        if not file.is_file():
            raise PloraError(f"{directory}: no {PLORA_JSON}; not an adapter written by plora train")
        obj = read_object(file)
        missing = missing_keys(obj, _SHAPE)
        if missing:
            raise PloraError(f"{file}: missing {', '.join(missing)}; not a plora.json this version can read")
        if obj["format_version"] != ADAPTER_FORMAT:
            raise PloraError(
                f"{file}: format_version {obj['format_version']!r}, this plora reads {ADAPTER_FORMAT}"
            )
        problem = _problem(obj)
        if problem is not None:
            raise PloraError(f"{file}: {problem}")
        export = obj.get("export")
        return AdapterMeta(
            plora_version=obj["plora_version"],
            base_model=obj["base_model"],
            model=obj["model"],
            tokenizer=obj["tokenizer"],
            special_tokens=obj["special_tokens"],
            patch_rope=obj["patch_rope"],
            rope_2d_ratio=float(obj["rope_2d_ratio"]),
            pair_indices=tuple(obj["pair_indices"]),
            num_pairs=obj["num_pairs"],
            stride=obj["stride"],
            mask=obj["mask"],
            align=obj["align"],
            packing=obj["packing"],
            attn=obj["attn"],
            dtype=obj["dtype"],
            lora=obj["lora"],
            shards=obj["shards"],
            step=obj["step"],
            export=ExportInfo(**{key: export[key] for key in _EXPORT_SHAPE}) if export is not None else None,
            source=Path(directory),
        )


def _problem(obj: dict[str, Any]) -> str | None:
    """What is wrong with the values of a plora.json whose keys are all there, or None."""
    problem = fields_problem(obj, _SHAPE) or fields_problem(obj["tokenizer"], _TOKENIZER_SHAPE, "tokenizer.")
    if problem is None and "export" in obj:
        problem = fields_problem(obj, {"export": dict}) or fields_problem(
            obj["export"], _EXPORT_SHAPE, "export."
        )
    if problem is None and not all(
        isinstance(i, int) and not isinstance(i, bool) for i in obj["pair_indices"]
    ):
        problem = f"pair_indices {obj['pair_indices']!r} is not a list of integers"
    if problem is None and (obj["mask"] not in MASK_MODES or obj["align"] not in ALIGN_MODES):
        problem = f"unknown mask {obj['mask']!r} or align {obj['align']!r}"
    return problem
