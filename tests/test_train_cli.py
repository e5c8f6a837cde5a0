"""`plora train` / `plora eval` as a user runs them, and the original guide's script with its own flags."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_cli, run_plora
from train_helpers import REPO_ROOT, cli_args, subprocess_env

from pipeline.shards import open_shards
from trainer.checkpoint import final_checkpoint

NAME = "hf_parallel_lora"


def _run(program: str | Path, *args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """The guide's script in a real process (it is its own entry point)."""
    return run_plora(Path(program), *args, cwd=REPO_ROOT, env=subprocess_env(), timeout=timeout)


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=REPO_ROOT)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shards", "/nonexistent/shards"], "/nonexistent/shards: no such shard directory"),
        (["--mask", "diagonal"], "--mask must be one of isolated, columnar, got 'diagonal'"),
        (["--attn", "flash_attention_2"], "unknown attention implementation 'flash_attention_2'"),
        (["--stride", "3000"], "beyond the model's max_position_embeddings 4096; train with a smaller"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(
    extra: list[str], message: str, train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    done = _cli(*cli_args(train_shards, tiny_model_dir, tmp_path / "out", *extra))
    assert message in one_line_error(done)
    assert not (tmp_path / "out" / "lora").exists() or not any((tmp_path / "out" / "lora").iterdir())


def test_guide_spellings_train_and_eval_reports_per_branch_count(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    relative = os.path.relpath(tiny_model_dir, REPO_ROOT)  # _cli's working directory
    guide_flags = [
        "train", "--shards", train_shards, "--base_model", relative, "--out_dir", out,
        "--batch_size", "4", "--learning_rate", "3e-3", "--lora_rank", "4", "--accumulation_steps", "1",
        "--grad_clip", "1.0",
        "--no_patch_rope", "--save_interval", "500", "--log_interval", "50", "--dtype", "float32",
        "--max-steps", "6", "--no-progress",
    ]  # fmt: skip
    trained = _cli(*guide_flags)
    assert trained.returncode == 0, trained.stderr[-3000:]
    adapter = final_checkpoint(out, NAME)
    meta = json.loads((adapter / "plora.json").read_text())
    assert meta["patch_rope"] is False and meta["pair_indices"] == [] and meta["stride"] == 0
    assert meta["base_model"] == os.path.abspath(tiny_model_dir)  # usable from any working directory
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4

    evaluate = ["eval", "--shards", train_shards, "--base-model", tiny_model_dir]
    report = _cli(*evaluate, "--adapter", adapter, "--json")
    assert report.returncode == 0, report.stderr[-3000:]
    result = json.loads(report.stdout)
    manifest = open_shards(train_shards).manifest
    assert result["tokens"] == manifest.num_trained and result["rows"] == manifest.num_rows
    assert result["model"]["pair_indices"] == [] and result["model"]["stride"] == 0
    per_branch = result["by_branches"]
    assert len(per_branch) >= 2  # text rows of 4 branches and parallel records of other sizes
    assert sum(v["tokens"] for v in per_branch.values()) == result["tokens"]
    weighted = sum(v["loss"] * v["tokens"] for v in per_branch.values()) / result["tokens"]
    assert weighted == pytest.approx(result["loss"])

    table = _cli(*evaluate)
    assert table.returncode == 0, table.stderr[-3000:]
    too_far = _cli(*evaluate, "--stride", "3000")  # with the progress bar: still one line
    assert "beyond the model's max_position_embeddings 4096; train with a smaller --stride" in one_line_error(
        too_far
    )
    last = table.stdout.strip().splitlines()[-1].split()
    assert last[0] == "all" and int(last[2]) == manifest.num_trained and float(last[3]) > 0


@pytest.mark.slow
def test_guide_script_takes_jsonl_tokenizes_once_and_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    script = REPO_ROOT / "trainer" / "train_hf_parallel_lora.py"
    guide = [
        sys.executable, script, "--base_model", tiny_model_dir,
        "--data_path", REPO_ROOT / "data" / "sample_parallel.jsonl",
        "--lora_rank", "8", "--rope_2d_ratio", "0.5", "--batch_size", "4", "--epochs", "1",
        "--max_seq_len", "64", "--branches_per_sample", "4", "--out_dir", tmp_path, "--dtype", "float32",
        "--ddp", "--max-steps", "2", "--no-progress",
    ]  # fmt: skip
    first = _run(*guide)
    assert first.returncode == 0, first.stderr[-3000:]
    caches = list((tmp_path / "shards").iterdir())
    assert len(caches) == 1 and open_shards(caches[0]).manifest.packing["max_seq_len"] == 64
    assert (final_checkpoint(tmp_path, NAME) / "adapter_model.safetensors").is_file()
    again = _run(*guide)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is up to date" in again.stderr
    missing = _run(sys.executable, script, "--base_model", tiny_model_dir, "--out_dir", tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("plora: error: no training data")


def test_guide_import_of_auto_pair_indices(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.train_hf_parallel_lora import auto_pair_indices

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert auto_pair_indices(model, ratio=0.5) == [5, 6, 7, 8]


@pytest.mark.ddp
def test_guide_script_on_two_nodes_tokenizes_once_on_global_rank_0(
    tiny_model_dir: Path, torchrun_bin: Path, tmp_path: Path
) -> None:
    """Two torchrun agents of one process each (two "nodes" of one machine): each process is its node's
    local rank 0, but only global rank 0 may tokenize into the shared --out_dir."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = REPO_ROOT / "trainer" / "train_hf_parallel_lora.py"
    guide = [
        script, "--base_model", tiny_model_dir, "--data_path", REPO_ROOT / "data" / "sample_parallel.jsonl",
        "--lora_rank", "4", "--batch_size", "2", "--max_seq_len", "64", "--branches_per_sample", "4",
        "--out_dir", tmp_path, "--dtype", "float32", "--device", "cpu", "--max-steps", "1", "--no-progress",
    ]  # fmt: skip
    nodes = [
        subprocess.Popen(
            [
                str(a)
                for a in (
                    torchrun_bin,
                    "--nnodes",
                    "2",
                    "--nproc_per_node",
                    "1",
                    "--node_rank",
                    str(node),
                    "--rdzv_backend",
                    "static",
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    str(port),
                    *guide,
                )
            ],  # fmt: skip
            env=subprocess_env(),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    summaries = [err.count("plora tokenize: ") for _, err in outputs]
    assert summaries == [1, 0]
    assert (final_checkpoint(tmp_path, NAME) / "adapter_model.safetensors").is_file()


def test_issue7_item5_eval_defaults_to_the_adapters_training_dtype(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    trained = _cli(*cli_args(train_shards, tiny_model_dir, out, "--dtype", "bfloat16", "--max-steps", "2"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluate = ["eval", "--shards", train_shards, "--base-model", tiny_model_dir, "--json"]
    by_default = _cli(*evaluate, "--adapter", final_checkpoint(out, NAME))
    assert by_default.returncode == 0, by_default.stderr[-3000:]
    assert json.loads(by_default.stdout)["model"]["dtype"] == "bfloat16"
    base = _cli(*evaluate)  # a base model alone has no training dtype: float32 as before
    assert json.loads(base.stdout)["model"]["dtype"] == "float32"
