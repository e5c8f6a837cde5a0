"""The tiny offline model: loads like a HF model, speaks ChatML, round-trips text, builds once, atomically."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.tinymodel import (
    MARKER_NAME,
    VOCAB_SIZE,
    ensure_tiny_model,
    sample_files,
    sample_texts,
    train_tokenizer,
)

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Teal."},
]


def test_loads_offline_and_runs_a_forward_pass(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings
    ids = tokenizer("Feed the starter once a day.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_special_tokens_and_chatml_template(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert tokenizer("Hi")["input_ids"] == tokenizer("Hi", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("<|im_end|>")["input_ids"]) == ["<|im_end|>"]
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\nTeal.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_round_trips_and_loads_as_trained(tiny_model_dir: Path, sample_dir: Path) -> None:
    loaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    trained = train_tokenizer(sample_texts(sample_files()))
    assert len(loaded) == VOCAB_SIZE
    text = (sample_dir / "sample_text.txt").read_text(encoding="utf-8")
    docs = [doc for doc in text.split("\n\n") if doc.strip()]
    docs.append("Mixed scripts: naïve café, 你好, Привет, emoji 🙂, tabs\tand\n\nblank lines.")
    for doc in docs:
        ids = loaded(doc)["input_ids"]
        assert loaded.decode(ids) == doc
        # Loading may rebuild the pre-tokenizer from the model type; it must match what was trained.
        assert trained(doc)["input_ids"] == ids


def test_cache_is_reused_and_rebuild_is_byte_identical(tiny_model_dir: Path, tmp_path: Path) -> None:
    weights = tiny_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    ensure_tiny_model()
    assert weights.stat().st_mtime_ns == before
    assert not [p for p in tiny_model_dir.parent.iterdir() if p.name.endswith(".tmp")]

    rebuilt = ensure_tiny_model(cache_dir=tmp_path)
    assert rebuilt.name == tiny_model_dir.name
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert names == sorted(p.name for p in rebuilt.iterdir())
    assert MARKER_NAME in names and "model.safetensors" in names
    _, mismatch, errors = filecmp.cmpfiles(tiny_model_dir, rebuilt, names, shallow=False)
    assert mismatch == [] and errors == []


def test_llama_arch_shares_the_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    llama_dir = ensure_tiny_model(cache_dir=tmp_path, arch="llama")
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    text = "Five ways to keep a starter alive, and one way to lose it."
    qwen2_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert AutoTokenizer.from_pretrained(llama_dir)(text) == qwen2_tokenizer(text)


@pytest.mark.slow
def test_cli_concurrent_builds_agree(plora_bin: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    cmd = [str(plora_bin), "tiny-model", "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert str(out) in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "qwen2"


def test_cli_refuses_a_foreign_directory_and_bad_arch(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    assert str(tmp_path) in one_line_error(run_cli("tiny-model", "--out", tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]

    run = run_cli("tiny-model", "--out", tmp_path / "x", "--arch", "gpt9")
    assert run.returncode == 2 and "gpt9" in run.stderr
    assert not (tmp_path / "x").exists()
