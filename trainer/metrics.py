"""What a run reports: a progress bar (loss, lr, tokens/s, ETA), metrics.jsonl, TensorBoard, wandb.

Only the main process reports; the others get a disabled log. Files live in ``<out_dir>/logs/<name>/``;
TensorBoard's in ``tensorboard/<run id>/`` below it, one directory per run (a resumed run keeps its id,
recorded in the checkpoints' trainer state), so TensorBoard shows each run as its own curve. On resume,
lines of metrics.jsonl past the resumed step (written after the checkpoint by the run that was
interrupted) are dropped so the file reads as one run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from parallel import atomic
from parallel.errors import missing_extra
from pipeline.progress import ProgressLine
from trainer.config import TrainConfig

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def logs_dir(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / "logs" / name


def new_run_id() -> str:
    """A fresh run's id: its start time, which sorts runs in TensorBoard's list as they were made."""
    return time.strftime("%Y%m%d-%H%M%S")


def epochs_text(epochs: float) -> str:
    """``1 epoch``, ``3 epochs``, ``1.54 epochs``."""
    count = f"{epochs:.2f}".rstrip("0").rstrip(".")
    return f"{count} epoch{'' if count == '1' else 's'}"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a last line cut short by a killed run is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    def __init__(self, cfg: TrainConfig, *, enabled: bool, start_step: int, run_id: str) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self.console = Console(stderr=True)
        self.progress: ProgressLine | None = None
        self._file = None
        self._tensorboard = None
        self._wandb = None
        self._interval = {"loss_tokens": 0.0, "trained": 0, "tokens": 0, "since": time.perf_counter()}
        self.total_steps = 0
        if not enabled:
            return
        directory = logs_dir(cfg.out_dir, cfg.lora_name)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / METRICS_FILE
        _truncate_after(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if cfg.use_wandb:
            try:
                import wandb  # noqa: PLC0415 - the optional 'wandb' extra
            except ImportError:
                raise missing_extra("--use-wandb", "wandb") from None
            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.lora_name, config=cfg.to_json())
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - needs the tensorboard package
        except ImportError:
            self.announce("tensorboard is not installed: metrics go to metrics.jsonl only")
        else:
            runs = directory / TENSORBOARD_DIR / run_id
            self._tensorboard = SummaryWriter(str(runs), purge_step=start_step + 1)

    def announce(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)  # above the progress line, which shares it

    def start(self, total_steps: int, start_step: int) -> None:
        self.total_steps = total_steps
        if not (self.enabled and self.cfg.progress):
            return
        self.progress = ProgressLine(
            "train", enabled=True, total=total_steps, completed=start_step, count=True, console=self.console
        )
        self.progress.start()
        self._interval["since"] = time.perf_counter()

    def step(self, done: int, *, loss: float, lr: float, grad_norm: float, tokens: int, trained: int) -> None:
        if not self.enabled:
            return
        interval = self._interval
        interval["loss_tokens"] += loss * trained
        interval["trained"] += trained
        interval["tokens"] += tokens
        elapsed = max(time.perf_counter() - interval["since"], 1e-9)
        rate = interval["tokens"] / elapsed
        if self.progress is not None:
            stats = f"loss {loss:.4f}  lr {lr:.2e}  {rate:,.0f} tok/s"
            self.progress.update(done, stats=stats)
        if done % self.cfg.log_interval and done != self.total_steps:
            return
        record = {
            "step": done,
            "loss": interval["loss_tokens"] / max(interval["trained"], 1),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": rate,
            "tokens": interval["tokens"],
            "time": time.time(),
        }
        self._write(record)
        self.announce(
            f"step {done}: loss {record['loss']:.4f}  lr {lr:.3e}  grad_norm {grad_norm:.3f}  "
            f"{rate:,.0f} tok/s"
        )
        self._interval = {"loss_tokens": 0.0, "trained": 0, "tokens": 0, "since": time.perf_counter()}

    def validation(self, done: int, val_loss: float) -> None:
        if self.enabled:
            self._write({"step": done, "val_loss": val_loss, "time": time.time()})
            self.announce(f"step {done}: validation loss {val_loss:.4f}")

    def _write(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k not in ("step", "time")}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary(self, result: Any) -> None:
        if not self.enabled:
            return
        val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        rate = result.tokens / max(result.seconds, 1e-9)
        self.announce(
            f"trained {result.steps} steps ({epochs_text(result.epochs)}): loss {result.first_loss:.4f} -> "
            f"{result.last_loss:.4f}{val}; {rate:,.0f} tokens/s; adapter in {result.final_dir}"
        )

    def close(self) -> None:
        self.stop()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    """Keep only the records of steps <= ``step`` (all of them gone when starting fresh)."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step] if step > 0 else []
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
