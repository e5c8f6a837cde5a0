"""One-line refusals and strict output of the `plora` script (issue 10, items 12, 13, 15, 21 and 22):
what cannot work is refused at once, before anything slow, and what is printed for scripts parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_plora


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_item12_flex_attention_on_cpu_is_one_line(
    command: str, plora_bin: Path, train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    if command == "generate":
        args = ["--base-model", tiny_model_dir, "--prompt", "Hi", "--num-branches", "2"]
    else:
        args = ["--shards", train_shards, "--base-model", tiny_model_dir]
    if command == "train":
        args += ["--out-dir", tmp_path / "out"]
    line = one_line_error(run_plora(plora_bin, command, *args, "--attn", "flex", "--device", "cpu"))
    assert "--attn flex needs CUDA" in line and "--attn sdpa" in line
    assert not (tmp_path / "out").exists()


def test_item13_parquet_null_text_says_null_with_file_and_row(plora_bin: Path, tmp_path: Path) -> None:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    pq.write_table(pa.table({"text": ["fine", None, "fine too"]}), tmp_path / "rows.parquet")
    line = one_line_error(run_plora(plora_bin, "convert", "rows.parquet", "--out", "out.jsonl", cwd=tmp_path))
    assert line.startswith("plora: error: rows.parquet:2: null field: 'text' is null;"), line
    assert "expected one of text, messages" in line and "unknown format" not in line


def test_item13_one_line_json_array_names_the_records_index(plora_bin: Path, tmp_path: Path) -> None:
    (tmp_path / "all.json").write_text('[{"text": "a"}, {"text": "b"}, {"foo": 1}, {"text": "c"}]')
    line = one_line_error(run_plora(plora_bin, "convert", "all.json", "--out", "out.jsonl", cwd=tmp_path))
    assert line.startswith("plora: error: all.json:1: item [2] of the array: unknown format"), line

    skipped = run_plora(
        plora_bin, "convert", "all.json", "--out", "out.jsonl", "--on-error", "skip", cwd=tmp_path
    )
    assert skipped.returncode == 0, skipped.stderr
    [entry] = [json.loads(x) for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert (entry["line"], entry["index"], entry["raw"]) == (1, 2, {"foo": 1})
