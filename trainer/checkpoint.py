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

import dataclasses
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
from parallel.adaptermeta import PLORA_JSON, AdapterMeta
from parallel.errors import PloraError
from parallel.jsonfile import Count, Shape, fields_problem, read_object

CHECKPOINT_FORMAT = 1
STATE_DIR = "trainer_state"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class RunIdentity:
    """What a resumed run must share with its checkpoint, or its data order and batches would differ
    (and, for the run's length, its learning-rate schedule and where it ends)."""

    seed: int
    group_by_length: bool
    val_fraction: float
    global_batch: int
    shards_digest: str
    total_steps: int

    def check_resumes(self, recorded: RunIdentity, resume_dir: str | Path) -> None:
        """Refuse to resume a checkpoint whose run differs from this one, naming the first setting."""
        for field in dataclasses.fields(self):
            was, now = getattr(recorded, field.name), getattr(self, field.name)
            if was != now:
                raise PloraError(
                    f"--resume {resume_dir}: {field.name} was {was!r}, now {now!r}; "
                    "resume with the checkpoint's settings"
                )


@dataclass(frozen=True)
class TrainerState:
    """trainer_state/state.json: where a run stands at a checkpoint, and the optimizer's param groups
    (its moments are in optimizer.safetensors beside it)."""

    identity: RunIdentity
    first_loss: float  # the run's first step, so a resumed run's summary covers the whole run
    last_loss: float
    run_id: str  # a resumed run keeps its TensorBoard directory
    step: int
    epoch: int
    step_in_epoch: int
    world_size: int
    tokens_seen: int
    scaler: dict[str, Any]  # GradScaler.state_dict(); empty when disabled
    config: dict[str, Any]  # the TrainConfig of the run that wrote it
    param_groups: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.identity),
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "run_id": self.run_id,
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "world_size": self.world_size,
            "tokens_seen": self.tokens_seen,
            "scaler": self.scaler,
            "config": self.config,
            "format": CHECKPOINT_FORMAT,
            "param_groups": list(self.param_groups),
        }

    @staticmethod
    def read(checkpoint: str | Path) -> TrainerState:
        """The trainer state of a checkpoint directory; a one-line error naming the file (and the key)
        if it is missing, not JSON, of another format or not what this version writes."""
        file = Path(checkpoint) / STATE_DIR / STATE_FILE
        if not file.is_file():
            raise PloraError(f"{checkpoint}: no {STATE_DIR}/{STATE_FILE}; not a checkpoint of plora train")
        obj = read_object(file)
        if obj.get("format") != CHECKPOINT_FORMAT:
            raise PloraError(
                f"{file}: checkpoint format {obj.get('format')!r}, this plora reads {CHECKPOINT_FORMAT}"
            )
        problem = fields_problem(obj, _STATE_SHAPE)
        if problem is not None:
            raise PloraError(f"{file}: {problem}")
        identity = RunIdentity(
            seed=obj["seed"],
            group_by_length=obj["group_by_length"],
            val_fraction=float(obj["val_fraction"]),
            global_batch=obj["global_batch"],
            shards_digest=obj["shards_digest"],
            total_steps=obj["total_steps"],
        )
        return TrainerState(
            identity=identity,
            first_loss=float(obj["first_loss"]),
            last_loss=float(obj["last_loss"]),
            run_id=obj["run_id"],
            step=obj["step"],
            epoch=obj["epoch"],
            step_in_epoch=obj["step_in_epoch"],
            world_size=obj["world_size"],
            tokens_seen=obj["tokens_seen"],
            scaler=obj["scaler"],
            config=obj["config"],
            param_groups=tuple(obj["param_groups"]),
        )


_IDENTITY_SHAPE: Shape = {
    "seed": int,
    "group_by_length": bool,
    "val_fraction": float,
    "global_batch": Count,
    "shards_digest": str,
    "total_steps": Count,
}
_STATE_SHAPE: Shape = {
    **_IDENTITY_SHAPE,
    "first_loss": float,
    "last_loss": float,
    "run_id": str,
    "step": Count,
    "epoch": Count,
    "step_in_epoch": Count,
    "world_size": Count,
    "tokens_seen": Count,
    "scaler": dict,
    "config": dict,
    "param_groups": list,
}


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
        found.append((read_trainer_state(final).step, final))
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
    plora_meta: AdapterMeta,
    state: TrainerState,
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
        plora_meta.write(tmp)
        moments, groups = _optimizer_to_flat(tensors.optimizer)
        (tmp / STATE_DIR).mkdir()
        save_file(moments, str(tmp / STATE_DIR / OPTIMIZER_FILE))
        state = dataclasses.replace(state, param_groups=tuple(groups))
        atomic.write_json(tmp / STATE_DIR / STATE_FILE, state.to_json())
        atomic.publish_dir(tmp, path)
        tmp = None
    except (OSError, SafetensorError) as err:
        raise outdir.write_failure(path, "the checkpoint", err) from None
    finally:  # a failed write, or Ctrl-C while writing: the partial temporary must not fill the disk
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def read_trainer_state(path: str | Path) -> TrainerState:
    """The trainer state of a checkpoint to resume; one-line error if it is not a resumable checkpoint."""
    missing = [name for name in (*ADAPTER_FILES, PLORA_JSON) if not (Path(path) / name).is_file()]
    if not Path(path).is_dir() or missing or not (Path(path) / STATE_DIR / STATE_FILE).is_file():
        raise PloraError(
            f"--resume {path}: not a plora checkpoint directory (adapter + {STATE_DIR}/{STATE_FILE})"
        )
    return TrainerState.read(path)


def load_optimizer(path: str | Path, optimizer: torch.optim.Optimizer, state: TrainerState) -> None:
    tensors = load_file(str(Path(path) / STATE_DIR / OPTIMIZER_FILE))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        if int(index) < len(params):  # more is refused below, by load_state_dict
            value = shard_like(value, params[int(index)])
        per_param.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state.param_groups]
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
