"""One-line refusals and strict output of the `plora` script (issue 10, items 12, 13, 15, 21 and 22):
what cannot work is refused at once, before anything slow, and what is printed for scripts parses."""

from __future__ import annotations

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
