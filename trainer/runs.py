"""What `plora runs OUT_DIR` shows: every run of an output directory, its checkpoints and loss curves.

A run is an adapter name: its metrics in ``logs/<name>/metrics.jsonl`` and its checkpoints in
``lora/<name>_step<N>/`` and ``lora/<name>_final/`` (see trainer.checkpoint and trainer.metrics).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parallel.errors import PloraError
from pipeline.draw import save_png
from trainer.checkpoint import STATE_DIR, STATE_FILE, TrainerState, lora_dir
from trainer.metrics import METRICS_FILE, read_metrics

_CHECKPOINT = re.compile(r"(?P<name>.+)_(?:step(?P<step>\d+)|final)")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    saved: float  # when it was published (modification time of its trainer state)
    train_loss: float | None  # the last logged training loss at or before its step
    val_loss: float | None  # the validation loss at its step, if the run validated there


@dataclass(frozen=True)
class Unreadable:
    """A published checkpoint whose trainer state cannot be read: shown as such, not a stop."""

    path: Path
    reason: str  # the one-line error


@dataclass(frozen=True)
class Run:
    name: str
    total_steps: int | None  # from the newest checkpoint's trainer state
    losses: list[tuple[int, float]]  # (step, logged training loss)
    val_losses: list[tuple[int, float]]
    times: list[float]  # the metrics records' wall-clock times
    checkpoints: list[Checkpoint]
    unreadable: list[Unreadable]

    @property
    def seconds(self) -> float | None:
        return self.times[-1] - self.times[0] if len(self.times) > 1 else None


def find_runs(out_dir: str | Path) -> list[Run]:
    """Every run in ``out_dir``, by name; a one-line error if it holds none."""
    out = Path(out_dir)
    if not out.is_dir():
        raise PloraError(f"{out}: no such directory (expected the --out-dir of plora train)")
    logs = {p.parent.name: p for p in (out / "logs").glob(f"*/{METRICS_FILE}") if p.is_file()}
    published: dict[str, list[Path]] = {}
    for path in lora_dir(out).glob("*"):
        match = _CHECKPOINT.fullmatch(path.name)
        if match and (path / STATE_DIR / STATE_FILE).is_file():
            published.setdefault(match.group("name"), []).append(path)
    names = sorted(set(logs) | set(published))
    if not names:
        raise PloraError(
            f"{out}: no training runs here (expected logs/<name>/{METRICS_FILE} or lora/<name>_step<N>/ "
            "from plora train)"
        )
    return [_read_run(name, logs.get(name), published.get(name, [])) for name in names]


def _read_run(name: str, metrics: Path | None, checkpoint_dirs: list[Path]) -> Run:
    records = read_metrics(metrics) if metrics is not None else []
    losses = [(int(r["step"]), float(r["loss"])) for r in records if "loss" in r]
    val_losses = [(int(r["step"]), float(r["val_loss"])) for r in records if "val_loss" in r]
    states: list[tuple[Path, TrainerState]] = []
    unreadable: list[Unreadable] = []
    for path in sorted(checkpoint_dirs):
        try:
            states.append((path, TrainerState.read(path)))
        except PloraError as err:
            unreadable.append(Unreadable(path, str(err)))
    checkpoints = sorted(
        (_checkpoint(path, state.step, losses, val_losses) for path, state in states),
        key=lambda c: (c.step, c.path.name),
    )
    total = max((s.identity.total_steps for _, s in states), default=None)
    times = [float(r["time"]) for r in records if "time" in r]
    return Run(name, total, losses, val_losses, times, checkpoints, unreadable)


def _checkpoint(
    path: Path, step: int, losses: list[tuple[int, float]], val_losses: list[tuple[int, float]]
) -> Checkpoint:
    train = [loss for at, loss in losses if at <= step]
    val = [loss for at, loss in val_losses if at == step]
    saved = (path / STATE_DIR / STATE_FILE).stat().st_mtime
    return Checkpoint(path, step, saved, train[-1] if train else None, val[-1] if val else None)


def write_curves_png(runs: list[Run], path: str | Path) -> Path:
    """The training (lines) and validation (dots) losses of every run against the step, as a PNG."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - the 'viz' extra, only when drawing

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        if run.losses:
            ax.plot(*zip(*run.losses, strict=True), color=color, label=f"{run.name} train")
        if run.val_losses:
            ax.plot(*zip(*run.val_losses, strict=True), "o--", color=color, label=f"{run.name} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend()
    return save_png(fig, path)


def describe(run: Run) -> dict[str, Any]:
    """One run's summary line facts: steps, first and last logged loss, best validation, duration."""
    best = min(run.val_losses, key=lambda v: v[1]) if run.val_losses else None
    return {
        "steps": run.losses[-1][0] if run.losses else max((c.step for c in run.checkpoints), default=0),
        "total_steps": run.total_steps,
        "first_loss": run.losses[0][1] if run.losses else None,
        "last_loss": run.losses[-1][1] if run.losses else None,
        "best_val": best,
        "seconds": run.seconds,
    }
