"""Shared fixtures: the tiny offline model, the installed `plora` script, sample and third-party data."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Tests never reach the model hub; everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.tinymodel import ensure_tiny_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The cached tiny Qwen2-style model (built on first use). Read-only: copy it before changing it."""
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def plora_bin() -> Path:
    """The installed `plora` console script next to this interpreter."""
    path = Path(sys.executable).parent / "plora"
    if not path.is_file():
        pytest.skip(f"console script {path} is missing; install the project first (`make install`)")
    return path


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The project's own sample data (data/)."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Third-party data (../shared/data next to the repo); skips the test where it is absent."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"third-party data directory {SHARED_DATA_DIR} is absent")
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def shared_file() -> Callable[[str], Path]:
    """``shared_file("alpaca_2k.json")``: the path of one third-party data file, or a clean skip."""

    def find(name: str) -> Path:
        path = SHARED_DATA_DIR / name
        if not path.is_file():
            pytest.skip(f"third-party data file {path} is absent")
        return path

    return find
