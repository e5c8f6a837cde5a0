"""Issue 10 item 10: an exported model loads only through plora (with its 2D RoPE), never silently as an
ordinary model in plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from train_helpers import cli_args

from parallel.errors import PloraError
from parallel.forward import forward_packed
from parallel.loading import export_model, load_parallel_model
from pipeline.shards import open_shards
from trainer.checkpoint import final_checkpoint


@pytest.fixture(scope="module")
def adapter(train_shards: Path, tiny_model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sealed") / "out"
    args = cli_args(train_shards, tiny_model_dir, out, "--max-steps", "2", "--lr", "2e-2")
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return final_checkpoint(out, "hf_parallel_lora")


@pytest.mark.parametrize("merge", [True, False])
def test_item10_export_refuses_plain_transformers_and_loads_in_plora(
    adapter: Path, train_shards: Path, tiny_model_dir: Path, tmp_path: Path, merge: bool
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    export = ["export", "--adapter", adapter, "--out", out, *(["--merge"] if merge else [])]
    exported = run_cli(*export)
    assert exported.returncode == 0, exported.stderr
    with pytest.raises(Exception, match="plora") as refused:
        AutoModelForCausalLM.from_pretrained(str(out))
    assert "plora-qwen2" in str(refused.value)

    row = open_shards(train_shards).row(0)
    ids, branch, time = (torch.from_numpy(getattr(row, n).astype(np.int64))[None]
                         for n in ("input_ids", "branch_id", "time_id"))  # fmt: skip
    logits = []
    for model, _, config in (load_parallel_model(out), load_parallel_model(tiny_model_dir, adapter)):
        with torch.no_grad():
            logits.append(forward_packed(model, ids, branch, time, mask=config.mask))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)

    generate = ["generate", "--adapter", out, "--prompt", "Three ways:", "--num-branches", "2"]
    generated = run_cli(*generate, "--max-new-tokens", "3", "--json")
    assert generated.returncode == 0, generated.stderr
    assert "plora-qwen2" not in generated.stderr  # transformers' warning about it is expected: not shown


def test_export_config_without_its_real_model_type_is_refused(adapter: Path, tmp_path: Path) -> None:
    out = export_model(adapter, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    del config["plora_model_type"]
    (out / "config.json").write_text(json.dumps(config))
    refused = r"config\.json: no plora_model_type; not a config\.json written by plora export$"
    with pytest.raises(PloraError, match=refused):
        load_parallel_model(out)
