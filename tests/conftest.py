"""Shared fixtures: the tiny offline model, the installed `plora` script, sample and third-party data,
and the shards the trainer tests train on."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Tests never reach the model hub; everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A suite started in the background (`cmd &` in a script, nohup) inherits SIGINT ignored, and so
# would every CLI the tests start and then interrupt; a handler, unlike SIG_IGN, is reset at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from parallel.errors import Rejects
from parallel.layout import PackingOptions
from pipeline.convert import ConvertOptions
from pipeline.tinymodel import ensure_tiny_model
from pipeline.tokenize import TokenizeJob, tokenize_to_shards

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The cached tiny Qwen2-style model (built on first use). Read-only: copy it before changing it."""
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def train_shards(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real shards of the sample data for the tiny model: texts packed 4 to a row plus explicit
    parallel records (with trunks), in several shard files. Built once per session; read-only."""
    out = tmp_path_factory.mktemp("train") / "shards"
    job = TokenizeJob(
        inputs=(SAMPLE_DIR / "sample_text.txt", SAMPLE_DIR / "sample_parallel.jsonl"),
        tokenizer=tiny_model_dir,
        out=out,
        packing=PackingOptions(branches=4, max_seq_len=48),
        convert=ConvertOptions(),
        rows_per_shard=8,
    )
    tokenize_to_shards(job, Rejects("raise"), progress=False)
    return out


@pytest.fixture(scope="session")
def one_step_adapter(
    train_shards: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An adapter of one training step on ``train_shards`` (float32, default 2D RoPE settings), in its
    own --out-dir. Built once per session; read-only."""
    from train_helpers import quick_config  # torch only where needed

    from trainer.loop import train

    out = tmp_path_factory.mktemp("adapter") / "out"
    return train(quick_config(train_shards, tiny_model_dir, out, max_steps=1)).final_dir


@pytest.fixture(scope="session")
def plora_bin() -> Path:
    """The installed `plora` console script next to this interpreter."""
    path = Path(sys.executable).parent / "plora"
    if not path.is_file():
        pytest.skip(f"console script {path} is missing; install the project first (`make install`)")
    return path


@pytest.fixture(scope="session")
def torchrun_bin() -> Path:
    """torchrun, which every torch install puts next to this interpreter (a missing one is a failure)."""
    path = Path(sys.executable).parent / "torchrun"
    assert path.is_file(), f"{path} is missing: torch is not installed as the project requires"
    return path


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The project's own sample data (data/)."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def shared_file() -> Callable[[str], Path]:
    """``shared_file("alpaca_2k.json")``: the path of one third-party data file, or a clean skip."""

    def find(name: str) -> Path:
        path = SHARED_DATA_DIR / name
        if not path.is_file():
            pytest.skip(f"third-party data file {path} is absent")
        return path

    return find
