"""Graceful stops and time-based saves, in process: a stop signal during a step lets that step finish,
saves a checkpoint there and raises Stopped; resuming from it ends with the adapter an uninterrupted run
writes, byte for byte. The subprocess versions (exit status, the one line, a second signal) are in
test_cli_process.py."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from train_helpers import quick_config

import trainer.loop
from parallel.errors import Stopped
from trainer.checkpoint import final_checkpoint, lora_dir, read_trainer_state, step_checkpoints
from trainer.loop import train
from trainer.stop import STOP_SIGNALS, graceful_stops

NAME = "hf_parallel_lora"
# Dropout and accumulation: randomness and state a resumed run must draw and hold alike.
COMMON = {"max_steps": 5, "batch_size": 2, "accumulation_steps": 2, "lora_dropout": 0.1, "log_interval": 1}


@pytest.fixture
def signal_handlers() -> Iterator[None]:
    """A stop leaves the default actions in place (a next signal kills); give pytest its own back."""
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


@pytest.mark.slow
def test_a_signal_mid_step_finishes_it_saves_and_resumes_to_the_same_adapter(
    train_shards: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signal_handlers: None,
) -> None:
    whole = train(quick_config(train_shards, tiny_model_dir, tmp_path / "whole", **COMMON))

    step = trainer.loop.train_step

    def signalled_in_step_3(run: trainer.loop.Run, batch: trainer.loop.StepBatch) -> trainer.loop.StepStats:
        if batch.step == 2:  # 0-based: the third update
            signal.raise_signal(signal.SIGTERM)
        return step(run, batch)

    monkeypatch.setattr(trainer.loop, "train_step", signalled_in_step_3)
    out = tmp_path / "stopped"
    with pytest.raises(Stopped) as stopped:
        train(quick_config(train_shards, tiny_model_dir, out, **COMMON))
    saved = lora_dir(out) / f"{NAME}_step3"
    assert stopped.value.signum == signal.SIGTERM
    assert (
        str(stopped.value)
        == f"at step 3: saved {saved}; to continue, run the same command with --resume latest"
    )
    assert [p for _, p in step_checkpoints(out, NAME)] == [saved] and not final_checkpoint(out, NAME).exists()
    assert read_trainer_state(saved).step == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second signal would have ended it at once

    monkeypatch.setattr(trainer.loop, "train_step", step)
    resumed = train(quick_config(train_shards, tiny_model_dir, out, resume="latest", **COMMON))
    adapter = "adapter_model.safetensors"
    assert (resumed.final_dir / adapter).read_bytes() == (whole.final_dir / adapter).read_bytes()


def test_time_based_saves_happen_between_save_intervals(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = quick_config(train_shards, tiny_model_dir, tmp_path, max_steps=3, save_every_minutes=1e-9)
    train(cfg)  # --save-interval is 1000: every save here is a timed one
    assert [s for s, _ in step_checkpoints(tmp_path, NAME)] == [1, 2]  # and _final at 3


@pytest.mark.parametrize("under_torchrun", [False, True])
def test_the_signal_after_one_stop_request_has_the_default_action(
    under_torchrun: bool, monkeypatch: pytest.MonkeyPatch, signal_handlers: None
) -> None:
    """Under torchrun a terminal's Ctrl-C comes twice (from the terminal and from torchrun): one request."""
    if under_torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with graceful_stops() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        if under_torchrun:
            assert signal.getsignal(signal.SIGINT) == stop.handle
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
