"""A run's --out-dir: claimed and locked by the writing process, never mixed with an earlier run.

A run is known by its adapter name: ``lora/<name>_step<N>/``, ``lora/<name>_final/`` and
``logs/<name>/`` (metrics.jsonl, TensorBoard files). A new run (no ``--resume``) into an --out-dir
that holds an earlier run of the same name is refused, naming ``--resume latest`` and ``--overwrite``;
``--overwrite`` removes that earlier run's files (and nothing else) first, so a later ``--resume latest``
can never pick up the old run's step. Besides ``lora/`` and ``logs/`` plora writes only ``shards/``
(the guide script's cache) into an --out-dir; anything else there needs ``--overwrite`` too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from parallel import atomic, outdir
from parallel.errors import PloraError
from trainer.checkpoint import final_checkpoint, lora_dir, step_checkpoints
from trainer.config import TrainConfig
from trainer.metrics import METRICS_FILE, TENSORBOARD_DIR, logs_dir

OUT_DIR_ENTRIES = ("lora", "logs", "shards")  # what plora writes in an --out-dir


@contextmanager
def claimed_out_dir(cfg: TrainConfig, is_main: bool) -> Iterator[Callable[[], None]]:
    """Hold --out-dir for the run: only the writing process (global rank 0) checks and locks it.

    Yields the call that removes an earlier run ``--overwrite`` replaces: the trainer makes it once
    every check of the new run has passed, so a run that cannot start leaves the old one intact."""
    if not is_main:
        yield lambda: None
        return
    if cfg.resume is not None and cfg.overwrite:
        raise PloraError("--resume and --overwrite contradict each other; pass one")
    outdir.refuse_protected(cfg.out_dir, "--out-dir", _inputs(cfg), may_hold_inputs=True)
    with outdir.lock(cfg.out_dir, "--out-dir"):
        replaced = _replaced_run(cfg) if cfg.resume is None else []

        def clear() -> None:
            for path in replaced:
                remove(path)

        yield clear


def earlier_run(out_dir: str | Path, name: str) -> list[Path]:
    """What a run of this adapter name wrote in ``out_dir``: checkpoints (and their temporaries), the
    final adapter, metrics and TensorBoard files."""
    logs = logs_dir(out_dir, name)
    found = [final_checkpoint(out_dir, name), logs / METRICS_FILE, logs / TENSORBOARD_DIR]
    found = [path for path in found if path.exists()]
    found += [path for _, path in reversed(step_checkpoints(out_dir, name))]
    return found + atomic.temporaries(lora_dir(out_dir), f"{name}_*")


def _inputs(cfg: TrainConfig) -> list[outdir.Protected]:
    return [
        ("the shards", cfg.shards),
        ("the base model", cfg.base_model),
        ("the tokenizer", cfg.tokenizer_path),
        ("the adapter", cfg.load_lora),
    ]


def _replaced_run(cfg: TrainConfig) -> list[Path]:
    """What a new run must replace in --out-dir: nothing, or (with --overwrite) an earlier run of
    its name; refused without --overwrite."""
    out = Path(cfg.out_dir)
    if out.is_dir():  # a file there fails in check_writable, with its own message
        outdir.refuse_foreign(
            out,
            "--out-dir",
            cfg.overwrite,
            lambda directory: _holds_only_runs(directory, cfg),
            overwrite_does="write into it anyway",
        )
    earlier = earlier_run(out, cfg.lora_name)
    if not earlier:
        return []
    if not cfg.overwrite:
        raise PloraError(
            f"--out-dir {out}: holds an earlier run of {cfg.lora_name} ({_listed(earlier, out)}); "
            "pass --resume latest to continue it, or --overwrite to start a new run there"
        )
    if cfg.load_lora is not None:
        adapter = outdir.real_target(cfg.load_lora)
        if any(adapter == p or p in adapter.parents for p in map(outdir.real_target, earlier)):
            raise PloraError(
                f"--load-lora {cfg.load_lora}: belongs to the earlier run that --overwrite would remove; "
                "copy it elsewhere or choose another --out-dir or --lora-name"
            )
    return earlier


def _listed(paths: list[Path], out: Path) -> str:
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    return f"{paths[0].relative_to(out)}{more}"


def _holds_only_runs(directory: Path, cfg: TrainConfig) -> bool:
    """Whether ``directory`` holds only what plora train writes, and this run's own inputs."""
    inputs = [outdir.real_target(path) for _, path in _inputs(cfg) if path is not None]
    return all(
        entry.name in OUT_DIR_ENTRIES or any(outdir.holds(entry, path) for path in inputs)
        for entry in directory.iterdir()
    )


def remove(path: Path) -> None:
    """Remove a file or a published directory; a directory is renamed to a temporary name first, so
    an interrupted removal never leaves a partial directory under a published name."""
    if path.is_dir() and not path.name.endswith(atomic.TEMP_SUFFIX):
        aside = atomic.temp_sibling(path)
        os.replace(path, aside)
        path = aside
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def prune_checkpoints(out_dir: str | Path, name: str, limit: int, keep: Path | None) -> None:
    """Keep only the newest ``limit`` step checkpoints (0: keep all); ``keep`` (the checkpoint the run
    was resumed from) is never removed, nor is the final adapter."""
    if limit <= 0:
        return
    kept = outdir.real_target(keep) if keep is not None else None
    for _, path in step_checkpoints(out_dir, name)[:-limit]:
        if outdir.real_target(path) != kept:
            remove(path)
