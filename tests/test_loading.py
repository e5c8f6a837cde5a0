"""Loading adapters for generation (settings from plora.json), export, and the loader's one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error, run_cli

from parallel.adaptermeta import AdapterMeta
from parallel.atomic import temporaries
from parallel.errors import PloraError
from parallel.forward import forward_packed
from parallel.generation import generate
from parallel.loading import MODEL_FACTS, load_parallel_model
from parallel.rope2d import rope2d_config
from pipeline.shards import open_shards
from pipeline.tinymodel import ensure_tiny_model
from trainer.config import TrainConfig
from trainer.model import PackedLoss, add_lora, apply_rope, load_base_model

# Deliberately not the defaults, so a loader that ignored plora.json would build another model.
TRAIN_FLAGS = {"--mask": "columnar", "--stride": "16", "--rope-2d-ratio": "0.25"}


def run_ok(*args: str) -> subprocess.CompletedProcess:
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir: Path, sample_dir: Path) -> dict[str, Path]:
    """A few steps of `plora train` on the sample parallel records (a high LR so the adapter matters)."""
    work = tmp_path_factory.mktemp("trained")
    records = work / "rec.jsonl"
    run_ok("convert", str(sample_dir / "sample_parallel.jsonl"), "--out", str(records))
    run_ok(
        "tokenize",
        str(records),
        "--tokenizer",
        str(tiny_model_dir),
        "--out",
        str(work / "shards"),
        "--branches",
        "4",
        "--max-seq-len",
        "64",
    )
    flags = [part for item in TRAIN_FLAGS.items() for part in item]
    run_ok(
        "train",
        "--shards",
        str(work / "shards"),
        "--base-model",
        str(tiny_model_dir),
        "--out-dir",
        str(work / "out"),
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        *flags,
    )
    adapter = work / "out" / "lora" / "hf_parallel_lora_final"
    return {"adapter": adapter, "shards": work / "shards", "work": work}


def row_batch(shards: Path, index: int = 0) -> dict[str, torch.Tensor]:
    row = open_shards(shards).row(index)
    out = {
        name: torch.from_numpy(getattr(row, name).astype(np.int64))[None]
        for name in ("input_ids", "branch_id", "time_id")
    }
    return out


def loaded_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], mask: str) -> torch.Tensor:
    with torch.no_grad():
        return forward_packed(model, batch["input_ids"], batch["branch_id"], batch["time_id"], mask=mask)


def test_adapter_reproduces_training_time_logits(trained, tiny_model_dir: Path) -> None:
    model, tokenizer, config = load_parallel_model(None, trained["adapter"])  # base model from plora.json
    assert (config.mask, config.stride, len(config.pair_indices)) == ("columnar", 16, 2)
    patch = rope2d_config(model)
    assert patch is not None and patch.stride == 16 and patch.pair_indices == config.pair_indices

    # The training-time model: the trainer's own code path, with the settings the run was given.
    cfg = TrainConfig(
        shards=str(trained["shards"]),
        base_model=str(tiny_model_dir),
        mask="columnar",
        stride=16,
        rope_2d_ratio=0.25,
        attn="sdpa",
        device="cpu",
        dtype="float32",
    )
    base = load_base_model(cfg.base_model, attn="sdpa", device=torch.device("cpu"), dtype="float32")
    rope = apply_rope(base, cfg)
    train_model = add_lora(base, cfg, str(trained["adapter"])).eval()
    loss_module = PackedLoss(train_model, mask=cfg.mask, stride=rope.stride)
    for index in (0, 5):
        batch = row_batch(trained["shards"], index)
        with torch.no_grad():
            ids, branch_id, time_id = batch["input_ids"], batch["branch_id"], batch["time_id"]
            expected = forward_packed(
                loss_module.model, ids, branch_id, time_id,
                mask=loss_module.mask, stride=loss_module.stride, attention_mask=torch.ones_like(ids),
            )  # fmt: skip
        torch.testing.assert_close(loaded_logits(model, batch, config.mask), expected, atol=1e-5, rtol=0)

    # ... and the adapter is not a no-op: the bare base with the same 2D RoPE gives other logits.
    bare, _, none = load_parallel_model(tiny_model_dir, ratio=0.25, stride=16)
    assert none is None
    batch = row_batch(trained["shards"])
    difference = loaded_logits(bare, batch, "columnar") - loaded_logits(model, batch, "columnar")
    assert difference.abs().max() > 1e-3

    # Generation picks the adapter's mask: columnar decoding of this model reproduces it.
    result = generate(model, tokenizer, "The river", branches=[" a", " b"], max_new_tokens=3)
    again = generate(model, tokenizer, "The river", branches=[" a", " b"], max_new_tokens=3, mask="columnar")
    assert result.texts == again.texts


@pytest.mark.parametrize("merge", [True, False])
def test_export_loads_without_the_base_model(trained, tiny_model_dir: Path, merge: bool) -> None:
    work = trained["work"]
    base_copy = work / f"base-copy-{merge}"
    shutil.copytree(tiny_model_dir, base_copy)
    out = work / f"export-{merge}"
    run_ok(
        "export",
        "--adapter",
        str(trained["adapter"]),
        "--out",
        str(out),
        "--base-model",
        str(base_copy),
        *(["--merge"] if merge else []),
    )
    shutil.rmtree(base_copy)  # the export must stand on its own
    meta = json.loads((out / "plora.json").read_text())
    assert meta["export"]["merged"] is merge and meta["mask"] == "columnar"
    assert meta["model"] == json.loads((trained["adapter"] / "plora.json").read_text())["model"]
    assert meta["export"]["source_base_model"] == str(base_copy.absolute())
    assert not temporaries(out.parent, out.name)
    exported, _, config = load_parallel_model(out)
    assert config is not None and config.stride == 16
    reference, _, _ = load_parallel_model(tiny_model_dir, trained["adapter"])
    batch = row_batch(trained["shards"])
    expected = loaded_logits(reference, batch, "columnar")
    torch.testing.assert_close(loaded_logits(exported, batch, config.mask), expected, atol=1e-5, rtol=0)


def test_bare_base_model_gets_2d_rope(tiny_model_dir: Path) -> None:
    model, tokenizer, config = load_parallel_model(tiny_model_dir)
    patch = rope2d_config(model)
    assert config is None and patch is not None and patch.stride == 128 and len(patch.pair_indices) == 4
    assert tokenizer.eos_token == "<|im_end|>"


def _copy_adapter(trained, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(trained["adapter"], copy)
    meta = json.loads((copy / "plora.json").read_text())
    edit(meta)
    (copy / "plora.json").write_text(json.dumps(meta))
    return copy


def test_foreign_tokenizer_is_refused(trained, tmp_path: Path) -> None:
    adapter = _copy_adapter(trained, tmp_path, lambda m: m["tokenizer"].update(vocab_sha256="0" * 64))
    foreign = r"^adapter .*: recorded tokenizer .* but the tokenizer of .* own base model$"
    with pytest.raises(PloraError, match=foreign):
        load_parallel_model(None, adapter)


def test_adapter_of_an_older_identity_version_says_so(trained, tmp_path: Path) -> None:
    adapter = _copy_adapter(trained, tmp_path, lambda m: m["tokenizer"].update(version=1))
    with pytest.raises(PloraError, match="identity version 1, this plora computes version 2"):
        load_parallel_model(None, adapter)
    unversioned = _copy_adapter(trained, tmp_path / "unversioned", lambda m: m["tokenizer"].pop("version"))
    with pytest.raises(PloraError, match=r"plora\.json: tokenizer\.version is missing$"):
        load_parallel_model(None, unversioned)


def test_plora_json_records_the_base_model(trained, tiny_model_dir: Path) -> None:
    meta = json.loads((trained["adapter"] / "plora.json").read_text())
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert meta["model"] == {key: config[key] for key in MODEL_FACTS}
    assert meta["model"]["architectures"] == ["Qwen2ForCausalLM"]
    assert meta["base_model"] == os.path.abspath(tiny_model_dir)


def test_foreign_architecture_is_refused(trained, tmp_path: Path) -> None:
    # plora.json's facts decide, not the config.json of the base it names (gone here).
    adapter = _copy_adapter(trained, tmp_path, lambda m: m.update(base_model=str(tmp_path / "gone")))
    llama = ensure_tiny_model(arch="llama")  # same tokenizer and sizes, another architecture
    with pytest.raises(PloraError, match=r"model_type is 'llama', but the adapter .* with 'qwen2'"):
        load_parallel_model(llama, adapter)


@pytest.mark.parametrize(("fact", "recorded"), [("hidden_size", 96), ("architectures", ["LlamaForCausalLM"])])
def test_base_model_other_than_the_recorded_facts_is_refused(
    trained, tiny_model_dir: Path, tmp_path: Path, fact: str, recorded: object
) -> None:
    adapter = _copy_adapter(trained, tmp_path, lambda m: m["model"].update({fact: recorded}))
    with pytest.raises(PloraError) as caught:
        load_parallel_model(tiny_model_dir, adapter)
    message = str(caught.value)
    assert message.startswith(f"{os.path.abspath(tiny_model_dir)}: {fact} is ") and "\n" not in message
    assert f"{recorded!r}; load it on its own base model" in message


def test_plora_json_reads_back_byte_for_byte(trained, tmp_path: Path) -> None:
    meta = AdapterMeta.read(trained["adapter"])
    assert (meta.mask, meta.stride, meta.step, meta.export) == ("columnar", 16, 3, None)
    meta.write(tmp_path)
    assert (tmp_path / "plora.json").read_bytes() == (trained["adapter"] / "plora.json").read_bytes()


def test_plora_json_of_a_wrong_type_names_the_file_and_key(trained, tmp_path: Path) -> None:
    adapter = _copy_adapter(trained, tmp_path, lambda m: m.update(stride="16"))
    with pytest.raises(PloraError, match=r'/adapter/plora\.json: stride is "16", expected an integer$'):
        load_parallel_model(None, adapter)


def test_incomplete_plora_json_is_refused(trained, tmp_path: Path) -> None:
    adapter = _copy_adapter(trained, tmp_path, lambda m: m.pop("stride"))
    with pytest.raises(PloraError, match="missing stride"):
        load_parallel_model(None, adapter)


def test_non_rope_base_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=2000, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / "gpt2" / name)
    with pytest.raises(PloraError, match="no rotary embedding") as caught:
        load_parallel_model(tmp_path / "gpt2")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--adapter", "{missing}", "--num-branches", "2", "--prompt", "x"], "no such adapter"),
        (["generate", "--adapter", "{plain}", "--num-branches", "2", "--prompt", "x"], "no plora.json"),
        (["export", "--adapter", "{missing}", "--out", "{out}"], "no such adapter"),
    ],
)
def test_cli_loading_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "plain").mkdir()
    names = {"missing": tmp_path / "missing", "plain": tmp_path / "plain", "out": tmp_path / "out"}
    assert message in one_line_error(run_cli(*(a.format(**names) for a in args)))
    assert not (tmp_path / "out").exists()
