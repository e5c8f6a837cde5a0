"""Optional dependencies are extras: without one, the command that needs it says which in one line.

A missing package is simulated by ``sys.modules[name] = None``, which makes ``import name`` fail as it
does where the package is not installed. (The 'hf' extra's error is tested through a real subprocess in
test_convert.py.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import cli.main
from parallel.errors import PloraError
from trainer.config import TrainConfig
from trainer.metrics import MetricsLog


def test_png_without_the_viz_extra_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(sys, "argv", ["plora", "runs", str(tmp_path), "--png", str(tmp_path / "loss.png")])
    with pytest.raises(SystemExit) as done:
        cli.main.main()
    assert done.value.code == 2
    expected = "plora: error: --png needs the 'viz' extra: pip install 'plora[viz]'\n"
    assert capsys.readouterr().err == expected
    assert not (tmp_path / "loss.png").exists()


def test_use_wandb_without_the_wandb_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = TrainConfig(shards="unused", base_model="unused", out_dir=str(tmp_path), use_wandb=True)
    with pytest.raises(PloraError) as err:
        MetricsLog(cfg, enabled=True, start_step=0, run_id="run")
    assert str(err.value) == "--use-wandb needs the 'wandb' extra: pip install 'plora[wandb]'"
