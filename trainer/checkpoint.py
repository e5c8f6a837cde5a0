"""Checkpoints: a standard PEFT adapter + plora.json + the trainer state, published atomically.

Layout of ``out/lora/<name>_step<N>/`` and ``out/lora/<name>_final/``::

    adapter_config.json, adapter_model.safetensors   # PEFT's own files (save_pretrained)
    plora.json                                        # what inference needs to rebuild the exact model
    trainer_state/optimizer.safetensors               # AdamW moments (full tensors, also under --fsdp)
    trainer_state/state.json                          # step, data position, scaler, param groups, config

A checkpoint is written into a temporary directory next to its final place, every file fsynced, then
renamed into place (:mod:`parallel.atomic`), so a directory with a final name is always whole; a
killed run leaves at most a hidden temporary directory, removed by the next run. Nothing is ever
unpickled: tensors are safetensors and everything else is JSON.

There is no RNG state to save: the loop reseeds torch from (seed, step, rank) before every step and
the data order is a function of (seed, epoch, step), so a resumed run draws exactly what an
uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from parallel import atomic, outdir
from parallel.adaptermeta import PLORA_JSON
from parallel.errors import PloraError

CHECKPOINT_FORMAT = 1
STATE_DIR = "trainer_state"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class CheckpointTensors:
    """The tensors a checkpoint holds, full (unsharded) whatever the training's parallelism."""

    adapter: dict[str, torch.Tensor] | None  # None: the model's own weights (they are not sharded)
    optimizer: dict[str, Any]  # optimizer.state_dict()'s layout


def lora_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "lora"


def step_checkpoint(out_dir: str | Path, name: str, step: int) -> Path:
    return lora_dir(out_dir) / f"{name}_step{step}"


def final_checkpoint(out_dir: str | Path, name: str) -> Path:
    return lora_dir(out_dir) / f"{name}_final"


def step_checkpoints(out_dir: str | Path, name: str) -> list[tuple[int, Path]]:
    """(step, directory) of every published step checkpoint of this adapter name, oldest first."""
    pattern = re.compile(rf"{re.escape(name)}_step(\d+)")
    return sorted(
        (int(m.group(1)), p)
        for p in lora_dir(out_dir).glob(f"{name}_step*")
        if p.is_dir() and (m := pattern.fullmatch(p.name))
    )


def latest_checkpoint(out_dir: str | Path, name: str) -> Path | None:
    """The checkpoint (step or final) with the highest step; every published directory is complete."""
    found = step_checkpoints(out_dir, name)
    final = final_checkpoint(out_dir, name)
    if (final / STATE_DIR / STATE_FILE).is_file():
        found.append((int(read_trainer_state(final)["step"]), final))
    return max(found)[1] if found else None


def remove_stale_temporaries(out_dir: str | Path, name: str) -> None:
    """Temporary directories left by a killed run of this adapter name (never a published one)."""
    for path in atomic.temporaries(lora_dir(out_dir), f"{name}_*"):
        shutil.rmtree(path, ignore_errors=True)


def check_writable(out_dir: str | Path) -> None:
    """Fail before training if checkpoints could not be written."""
    target = lora_dir(out_dir)
    probe = target / f".write-probe-{os.getpid()}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PloraError(
            f"--out-dir {out_dir}: cannot write checkpoints there ({err.strerror or err})"
        ) from None


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    plora_meta: dict[str, Any],
    state: dict[str, Any],
    tensors: CheckpointTensors,
) -> None:
    """Write adapter, plora.json and trainer state under a temporary name, then publish at ``path``.

    A failed write (disk full) is one line naming ``path``, and the partial temporary directory is
    removed at once, so it does not keep the disk full."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.make_temp_dir(path)
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=tensors.adapter)
        atomic.write_json(tmp / PLORA_JSON, plora_meta)
        moments, groups = _optimizer_to_flat(tensors.optimizer)
        (tmp / STATE_DIR).mkdir()
        save_file(moments, str(tmp / STATE_DIR / OPTIMIZER_FILE))
        atomic.write_json(
            tmp / STATE_DIR / STATE_FILE, {**state, "format": CHECKPOINT_FORMAT, "param_groups": groups}
        )
        atomic.publish_dir(tmp, path)
        tmp = None
    except (OSError, SafetensorError) as err:
        raise outdir.write_failure(path, "the checkpoint", err) from None
    finally:  # a failed write, or Ctrl-C while writing: the partial temporary must not fill the disk
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The scalars of a checkpoint's trainer state; one-line error if it is not a resumable checkpoint."""
    file = Path(path) / STATE_DIR / STATE_FILE
    missing = [name for name in (*ADAPTER_FILES, PLORA_JSON) if not (Path(path) / name).is_file()]
    if not Path(path).is_dir() or missing or not file.is_file():
        raise PloraError(
            f"--resume {path}: not a plora checkpoint directory (adapter + {STATE_DIR}/{STATE_FILE})"
        )
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PloraError(f"{file}: not valid JSON ({err})") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise PloraError(
            f"{file}: checkpoint format {state.get('format')!r}, this plora reads {CHECKPOINT_FORMAT}"
        )
    return state


def load_optimizer(path: str | Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    tensors = load_file(str(Path(path) / STATE_DIR / OPTIMIZER_FILE))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        if int(index) < len(params):  # more is refused below, by load_state_dict
            value = shard_like(value, params[int(index)])
        per_param.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["param_groups"]]
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise PloraError(f"--resume {path}: optimizer state does not fit this model ({err})") from None


def _optimizer_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors = {
        f"state.{index}.{name}": value.detach().contiguous().cpu()
        for index, per_param in state_dict["state"].items()
        for name, value in per_param.items()
    }
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]
    ]
    return tensors, groups


def shard_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full optimizer-state tensor as this rank's shard of an FSDP ``param`` (unchanged for a plain
    parameter, or for a scalar such as AdamW's step). Every rank read the same file: no communication."""
    if not isinstance(param, DTensor) or tensor.shape != param.shape:
        return tensor
    return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
