"""Tokenizers and models from a local directory or a HuggingFace hub id (parallel.pretrained), through
every loader: `plora tokenize` (pipeline), `plora eval` (trainer) and `plora generate` (parallel)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_plora

from parallel.errors import PloraError
from parallel.fingerprint import tokenizer_identity
from parallel.pretrained import Pretrained, resolve_pretrained
from parallel.tokenizer import load_tokenizer

HUB_ID = "plora-test/tiny-model"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the hub cache names snapshots
OFFLINE = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "org_1/name.v2"])
def test_hub_ids_are_left_to_transformers(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_pretrained(name, what="base model") == Pretrained(name, local=False)


@pytest.mark.parametrize("name", ["./Qwen", "../Qwen", "~/no-such-model-here", "a/b/c", "org/..", "org--x/y"])
def test_missing_local_paths_are_no_such_directory(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PloraError, match=r"no such tokenizer directory") as caught:
        resolve_pretrained(name, what="tokenizer")
    assert str(caught.value).startswith(f"{name}: ") and "\n" not in str(caught.value)
    with pytest.raises(PloraError, match="no such base model directory"):
        resolve_pretrained(tmp_path / "absent", what="base model")


def test_an_existing_relative_directory_is_local_and_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "org" / "model").mkdir(parents=True)  # spelled like a hub id, but here on disk
    (tmp_path / "weights.bin").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert resolve_pretrained("org/model", what="model") == Pretrained(str(tmp_path / "org" / "model"), True)
    with pytest.raises(PloraError, match="weights.bin: not a directory"):
        resolve_pretrained("weights.bin", what="model")


def test_cli_uncached_hub_id_offline_is_one_line(plora_bin: Path, sample_dir: Path, tmp_path: Path) -> None:
    records = sample_dir / "sample_parallel.jsonl"
    out = tmp_path / "shards"
    env = {**OFFLINE, "HF_HUB_CACHE": str(tmp_path / "empty-hub-cache")}
    args = ["tokenize", records, "--tokenizer", "some-org/some-model", "--out", out]
    done = run_plora(plora_bin, *args, env=env)
    line = one_line_error(done)
    assert "some-org/some-model: cannot load the tokenizer" in line and "HF_HUB_OFFLINE" in line
    assert not out.exists()


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A HuggingFace hub cache holding the tiny model as if downloaded under HUB_ID."""
    root = tmp_path_factory.mktemp("hub-cache")
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(tiny_model_dir, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return root


def test_cli_cached_hub_id_loads_in_every_loader(
    plora_bin: Path, sample_dir: Path, tiny_model_dir: Path, hub_cache: Path, tmp_path: Path
) -> None:
    env = {**OFFLINE, "HF_HUB_CACHE": str(hub_cache)}
    shards = tmp_path / "shards"
    records = sample_dir / "sample_parallel.jsonl"
    tokenized = run_plora(plora_bin, "tokenize", records, "--tokenizer", HUB_ID, "--out", shards, env=env)
    assert tokenized.returncode == 0, tokenized.stderr
    recorded = json.loads((shards / "manifest.json").read_text())["tokenizer"]
    assert recorded["name_or_path"] == HUB_ID
    assert recorded["vocab_sha256"] == tokenizer_identity(load_tokenizer(tiny_model_dir))["vocab_sha256"]

    evaluated = run_plora(
        plora_bin, "eval", "--shards", shards, "--base-model", HUB_ID, "--device", "cpu", "--json", env=env
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["tokens"] > 0

    generated = run_plora(
        plora_bin, "generate", "--base-model", HUB_ID, "--prompt", "The river", "--num-branches", "2",
        "--max-new-tokens", "2", "--device", "cpu", "--json", env=env,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip()


def test_relative_path_that_does_not_exist_is_not_sent_to_the_hub(
    plora_bin: Path, sample_dir: Path, tmp_path: Path
) -> None:
    env = {**OFFLINE, "HF_HUB_CACHE": str(tmp_path / "empty-hub-cache")}
    records = sample_dir / "sample_parallel.jsonl"
    done = run_plora(
        plora_bin, "tokenize", records, "--tokenizer", "./models/tiny", "--out", tmp_path / "o", env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert "./models/tiny: no such tokenizer directory" in one_line_error(done)
    assert os.listdir(tmp_path) == []
