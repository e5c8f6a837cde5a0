"""One-line refusals and strict output of the `plora` script (issue 10, items 12, 13, 15, 21 and 22):
what cannot work is refused at once, before anything slow, and what is printed for scripts parses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import one_line_error, run_cli, run_plora

from pipeline.shards import open_shards, write_manifest, write_shard


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_item12_flex_attention_on_cpu_is_one_line(
    command: str, train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    if command == "generate":
        args = ["--base-model", tiny_model_dir, "--prompt", "Hi", "--num-branches", "2"]
    else:
        args = ["--shards", train_shards, "--base-model", tiny_model_dir]
    if command == "train":
        args += ["--out-dir", tmp_path / "out"]
    line = one_line_error(run_cli(command, *args, "--attn", "flex", "--device", "cpu"))
    assert "--attn flex needs CUDA" in line and "--attn sdpa" in line
    assert not (tmp_path / "out").exists()


def test_item13_parquet_null_text_says_null_with_file_and_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["fine", None, "fine too"]}), tmp_path / "rows.parquet")
    line = one_line_error(run_cli("convert", "rows.parquet", "--out", "out.jsonl", cwd=tmp_path))
    assert line.startswith("plora: error: rows.parquet:2: null field: 'text' is null;"), line
    assert "expected one of text, messages" in line and "unknown format" not in line


def test_item13_one_line_json_array_names_the_records_index(tmp_path: Path) -> None:
    (tmp_path / "all.json").write_text('[{"text": "a"}, {"text": "b"}, {"foo": 1}, {"text": "c"}]')
    line = one_line_error(run_cli("convert", "all.json", "--out", "out.jsonl", cwd=tmp_path))
    assert line.startswith("plora: error: all.json:1: item [2] of the array: unknown format"), line

    skipped = run_cli("convert", "all.json", "--out", "out.jsonl", "--on-error", "skip", cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    [entry] = [json.loads(x) for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert (entry["line"], entry["index"], entry["raw"]) == (1, 2, {"foo": 1})


def _strict_json(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, which are not JSON."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _without_training_on(source: Path, out: Path, branches: int) -> None:
    """A copy of ``source`` whose rows with ``branches`` branches train no token (a valid manifest)."""
    shards = open_shards(source)
    manifest = shards.manifest
    out.mkdir()
    start = 0
    files = []
    for index, entry in enumerate(manifest.files):
        rows = [shards.row(i) for i in range(start, start + entry.rows)]
        start += entry.rows
        untrained = [
            dataclasses.replace(r, labels=np.full_like(r.labels, -100)) if r.num_branches == branches else r
            for r in rows
        ]
        files.append(write_shard(out, index, untrained))
    trained = sum(entry.trained for entry in files)
    write_manifest(out, dataclasses.replace(manifest, files=tuple(files), num_trained=trained))


def test_item22_eval_json_gives_null_for_a_branch_count_without_trained_tokens(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    counts = sorted(set(open_shards(train_shards).metadata()["num_branches"].tolist()))
    untrained = counts[0]
    shards = tmp_path / "shards"
    _without_training_on(train_shards, shards, untrained)
    args = ["eval", "--shards", shards, "--base-model", tiny_model_dir, "--device", "cpu", "--no-progress"]

    done = run_cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    facts = _strict_json(done.stdout)
    assert facts["by_branches"][str(untrained)]["loss"] is None
    assert facts["by_branches"][str(untrained)]["tokens"] == 0
    assert all(facts["by_branches"][str(k)]["loss"] > 0 for k in counts[1:])
    assert facts["loss"] > 0

    table = run_cli(*args)
    assert table.returncode == 0, table.stderr
    [row] = [line.split() for line in table.stdout.splitlines() if line.split()[:1] == [str(untrained)]]
    assert row[2:] == ["0", "-"]


@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_item22_every_json_the_cli_prints_is_strict(
    command: str, train_shards: Path, tiny_model_dir: Path
) -> None:
    if command == "inspect":
        done = run_cli("inspect", train_shards, "--tokenizer", tiny_model_dir, "--json")
        documents = [done.stdout]
    else:
        args = ["--base-model", tiny_model_dir, "--prompt", "Hi", "--num-branches", "2", "--temperature", "1"]
        done = run_cli("generate", *args, "--max-new-tokens", "3", "--seed", "0", "--json")
        documents = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    assert documents and all(_strict_json(document) for document in documents)


def test_item21_inspect_png_makes_its_directory(train_shards: Path, tmp_path: Path) -> None:
    png = tmp_path / "new" / "deeper" / "row.png"
    done = run_cli("inspect", train_shards, "--png", png)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in png.parent.iterdir()) == ["row.png"]


def test_item21_inspect_png_refuses_another_format(train_shards: Path, tmp_path: Path) -> None:
    line = one_line_error(run_cli("inspect", train_shards, "--png", tmp_path / "out.jpg"))
    assert "out.jpg" in line and ".png" in line
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def adapter(one_step_adapter: Path) -> Path:
    """An adapter of one training step (plora.json: the default 2D RoPE ratio and stride)."""
    return one_step_adapter


@pytest.mark.parametrize(
    ("flag", "value"), [("--stride", "64"), ("--rope-2d-ratio", "0.25"), ("--mask", "columnar")]
)
def test_item21_eval_refuses_rope_flags_that_disagree_with_the_adapter(
    flag: str, value: str, train_shards: Path, tiny_model_dir: Path, adapter: Path
) -> None:
    args = ["eval", "--shards", train_shards, "--base-model", tiny_model_dir, "--adapter", adapter]
    line = one_line_error(run_cli(*args, flag, value, "--no-progress"))
    recorded = json.loads((adapter / "plora.json").read_text())[flag[2:].replace("-", "_")]
    assert f"{flag} {value} disagrees with adapter {adapter}, trained with {recorded}" in line


def test_item21_eval_takes_rope_flags_that_agree_with_the_adapter(
    train_shards: Path, tiny_model_dir: Path, adapter: Path
) -> None:
    recorded = json.loads((adapter / "plora.json").read_text())
    args = ["eval", "--shards", train_shards, "--base-model", tiny_model_dir, "--adapter", adapter, "--json"]
    agreeing = [
        "--stride",
        recorded["stride"],
        "--rope_2d_ratio",
        recorded["rope_2d_ratio"],
        "--mask",
        "isolated",
    ]
    done = run_cli(*args, *agreeing, "--no-progress", "--device", "cpu", "--max-rows", "2")
    assert done.returncode == 0, done.stderr
    assert _strict_json(done.stdout)["model"]["stride"] == recorded["stride"]


BAD_GENERATE_SETTINGS = [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--mask", "diagonal"], "--mask must be one of"),
    (["--dtype", "float8"], "--dtype must be one of"),
    (["--rope-2d-ratio", "2"], "--rope-2d-ratio must lie in [0, 1]"),  # was a ValueError traceback
]


@pytest.mark.parametrize(
    ("flags", "expect"), BAD_GENERATE_SETTINGS, ids=[" ".join(flags) for flags, _ in BAD_GENERATE_SETTINGS]
)
def test_item15_generate_refuses_bad_settings_before_loading_the_model(
    flags: list[str], expect: str, tmp_path: Path
) -> None:
    # No model is in this directory: refusing the setting first proves that nothing was loaded.
    (tmp_path / "not-a-model").mkdir()
    args = ["generate", "--base-model", tmp_path / "not-a-model", "--prompt", "Hi", "--num-branches", "2"]
    line = one_line_error(run_cli(*args, *flags))
    assert expect in line, line


# The hub is not offline by configuration but cannot be reached: nothing listens on the discard port.
# A real process: huggingface_hub reads these variables when it is imported.
UNREACHABLE_HUB = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("command", ["tokenize", "generate"])
def test_item15_unreachable_hub_fails_at_once_in_one_line(
    command: str, plora_bin: Path, sample_dir: Path, tmp_path: Path
) -> None:
    env = {**UNREACHABLE_HUB, "HF_HUB_CACHE": str(tmp_path / "empty-hub-cache")}
    if command == "tokenize":
        args = [sample_dir / "sample_text.txt", "--tokenizer", "some-org/some-model", "--out", tmp_path / "o"]
    else:
        args = ["--base-model", "some-org/some-model", "--prompt", "Hi", "--num-branches", "2"]
    line = one_line_error(run_plora(plora_bin, command, *args, env=env, timeout=60))  # no retry lines
    assert "some-org/some-model: cannot load the" in line
    assert "the hub (http://127.0.0.1:9) cannot be reached" in line and "local" in line
