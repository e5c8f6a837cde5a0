"""Issue 7 item 6: `make demo` on the real model, from the project's own list data (data/demo_lists.jsonl).

The demo script runs here on the tiny model (PLORA_DEMO_BASE) for two steps, so the test checks every
step's plumbing in seconds; the real model's run is `make demo`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli
from train_helpers import REPO_ROOT, subprocess_env

DEMO_LISTS = REPO_ROOT / "data" / "demo_lists.jsonl"


def test_issue7_item6_demo_lists_all_become_parallel_records_that_join_back(tmp_path: Path) -> None:
    out = tmp_path / "lists.jsonl"
    done = run_cli("convert", DEMO_LISTS, "--split-lists", "--out", out)
    assert done.returncode == 0, done.stderr
    originals = [json.loads(line) for line in DEMO_LISTS.read_text().splitlines()]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert 100 <= len(records) == len(originals)
    for original, record in zip(originals, records, strict=True):
        assert record["messages"] == [{"role": "user", "content": original["instruction"]}]
        assert 3 <= len(record["branches"]) <= 6
        assert record.get("lead", "") + "".join(record["branches"]) == original["output"]


@pytest.mark.slow
def test_issue7_item6_demo_script_trains_and_shows_before_and_after(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = {**subprocess_env(), "PLORA_DEMO_BASE": str(tiny_model_dir), "PLORA_DEMO_STEPS": "2"}
    script = REPO_ROOT / "scripts" / "demo_real.sh"
    demo = tmp_path / "demo"
    command = ["bash", str(script), sys.executable, str(demo)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "--split-lists: 119 records in, 119 parallel records out" in done.stderr
    assert (demo / "out" / "lora" / "hf_parallel_lora_final" / "adapter_model.safetensors").is_file()
    side_by_side = done.stdout.split("before | after")[1].split("== Done")[0].splitlines()
    assert [line[:3] for line in side_by_side if line[:1].isdigit()] == ["1: ", "2: ", "3: ", "4: "]
    for name in ("before", "after"):
        summary = json.loads((demo / "generated" / f"{name}.jsonl").read_text().splitlines()[-1])
        assert [b["prompt"] for b in summary["branches"]] == ["1.", "2.", "3.", "4."]  # --marker "{k}."
        assert len({tuple(b["token_ids"]) for b in summary["branches"]}) == 4  # --distinct
