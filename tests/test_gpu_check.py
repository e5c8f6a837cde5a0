"""bench/gpu_check.py: its CPU smoke run goes through every check and prints the tables; unequal first
losses fail the check."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import gpu_check


def test_smoke_run_prints_every_check(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        status = gpu_check.main(["--smoke"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "| sdpa | off |" in out and "| sdpa | on |" in out
    for k in gpu_check.SMOKE.ks:
        assert f"| sdpa | {k} |" in out
    assert "FAIL" not in out and "all checks passed" in out


def test_differing_first_losses_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_variant(*_: Any, attn: str, checkpointing: bool) -> dict[str, Any]:
        return {"first_loss": 2.0 + checkpointing * 0.1}  # checkpointing changed the loss by 5%

    monkeypatch.setattr(gpu_check, "train_variant", fake_variant)
    results = gpu_check.training_checks(Path("unused"), gpu_check.SMOKE, torch.device("cpu"), 1.0)
    attns = len(gpu_check.SMOKE.attns)
    assert [r["loss_ok"] for r in results] == [True, False] * attns
    assert gpu_check.failures(results, []) == attns


def test_no_check_starts_past_the_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "train_variant", lambda *_, **__: pytest.fail("a variant started"))
    cpu, past = torch.device("cpu"), -math.inf
    training = gpu_check.training_checks(Path("unused"), gpu_check.SMOKE, cpu, 1.0, past)
    decoding = gpu_check.decoding_checks(Path("unused"), gpu_check.SMOKE, cpu, past)
    # Skipped checks count as failed: two trainings (checkpointing off, on) and one decoding per attention.
    assert gpu_check.failures(training, decoding) == 3 * len(gpu_check.SMOKE.attns)
