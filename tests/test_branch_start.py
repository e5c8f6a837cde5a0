"""Issue 7 item 3: every branch's first token is trained, from a start token at the branch's own
2D position, so the branch coordinate can decide it; old shards without starts are not reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error, run_cli
from contract_check import check_rows
from models import tiny_model

from parallel.decoder import DecodeStep, decode_parallel
from parallel.errors import Rejects
from parallel.forward import forward_packed
from parallel.layout import PackingOptions, SpecialTokens, TokenSequence, build_row, record_to_json
from parallel.rope2d import patch_model_2d_rope
from parallel.tokenizer import load_tokenizer
from pipeline.convert import ConvertOptions, iter_records
from pipeline.shards import MANIFEST_NAME, SEAL_KEY, manifest_seal
from pipeline.tokenize import pack_records

# Every content token of these records is trained (texts, and parallel string branches).
TRAINED_RECORDS: list[dict[str, Any]] = [
    {"text": "Short text."},
    {"main": "Three facts about owls:", "branches": ["They hunt at night.", "They turn their heads."]},
    {"text": "The old mill by the river ground wheat for two hundred years. " * 4},
    {"main": "", "branches": ["A branch with no trunk.", "Another one."]},
    {"main": "Hi", "branches": ["One.", "Two."]},
    {"text": "One more text."},
]
CHAT_PARALLEL_RECORDS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Name two colours."}], "branches": ["Blue.", "Green."]},
    {
        "messages": [{"role": "user", "content": "A passage: the mill ground wheat."}],
        "branches": [{"prompt": "What did it grind?", "response": "Wheat."}, "It is about a mill."],
    },
]
PACKINGS = {
    "fixed-left": {"branches": 3, "max_seq_len": 32},
    "fixed-right": {"branches": 2, "max_seq_len": 32, "align": "right"},
    "dynamic-left": {"min_branches": 1, "max_branches": 3, "max_seq_len": 40, "seed": 1},
    "dynamic-right": {"min_branches": 1, "max_branches": 4, "max_seq_len": 40, "align": "right", "seed": 5},
}


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("packing", PACKINGS.values(), ids=PACKINGS.keys())
def test_item3_every_content_token_of_every_branch_has_a_label(
    packing: dict[str, Any], tiny_model_dir: Path, sample_dir: Path, tmp_path: Path
) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    # Texts and string branches, whose every token (and EOS) is trained; trunks aside.
    options = PackingOptions(**packing, train_trunk=False)
    trained_only = iter_records([write(tmp_path / "t.jsonl", TRAINED_RECORDS)], ConvertOptions(), Rejects())
    rows = list(pack_records(trained_only, tokenizer, options, Rejects()))
    for row in rows:  # every token after a branch's start is the label of the one before
        for b in range(1 if row.trunk_len else 0, int(row.branch_id.max()) + 1):
            ids, labels = row.input_ids[row.branch_id == b], row.labels[row.branch_id == b]
            assert labels[:-1].tolist() == ids[1:].tolist(), f"branch {b} of {row}"
    # ... and no content token lacks one: as many labels as the records have tokens (a branch's
    # first token, and the first of each piece of a text split for length, included).
    texts = [r["text"] for r in TRAINED_RECORDS if "text" in r]
    texts += [b for r in TRAINED_RECORDS for b in r.get("branches", [])]
    content = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert sum(row.num_trained for row in rows) == content
    # Every record kind (the sample data and chat parallel records): the independent checker, which
    # checks the label of every trained content token, a branch's first one included.
    inputs = sorted(p for p in sample_dir.glob("sample_*") if p.is_file())
    inputs.append(write(tmp_path / "chat_parallel.jsonl", CHAT_PARALLEL_RECORDS))

    def read() -> Any:
        return iter_records(inputs, ConvertOptions(), Rejects())

    records = [record_to_json(s.record) for s in read()]
    rows = list(pack_records(read(), tokenizer, options, Rejects()))
    assert check_rows(rows, records, tokenizer, options.to_json()) > 0


def test_item3_isolated_logits_for_each_branch_first_token_differ() -> None:
    model = tiny_model("qwen2")
    patch_model_2d_rope(model, ratio=0.5, stride=16)
    special = SpecialTokens(eos_id=2)
    content = [10, 11, 12, 2]
    trunk, branch = TokenSequence.of([5, 6, 7, 8], True), TokenSequence.of(content, True)
    row = build_row(trunk, [branch] * 3, "left", special)
    columns = (row.input_ids, row.branch_id, row.time_id)
    tensors = [torch.from_numpy(a.astype(np.int64))[None] for a in columns]
    logits = forward_packed(model, *tensors, mask="isolated")[0]
    predicting = []
    for b in (1, 2, 3):
        # The token whose label is the branch's first content token sits at the branch's own coordinate.
        (at,) = np.flatnonzero((row.branch_id == b) & (row.labels == content[0]))[:1]
        assert row.time_id[at] == row.trunk_len
        predicting.append(logits[at])
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(predicting[i], predicting[j], atol=1e-5, rtol=0), (i, j)
    # Generation takes each branch's first token from those same logits.
    steps: list[DecodeStep] = []
    decode_parallel(model, [5, 6, 7, 8], [[]] * 3, special=special, max_new_tokens=1, on_step=steps.append)
    for k in range(3):
        torch.testing.assert_close(steps[0].logits[k], predicting[k].float(), atol=1e-4, rtol=0)


def test_item3_shards_of_the_old_layout_are_not_reused(tiny_model_dir: Path, tmp_path: Path) -> None:
    records = write(tmp_path / "records.jsonl", TRAINED_RECORDS)
    out = tmp_path / "shards"
    args = ["tokenize", records, "--tokenizer", tiny_model_dir, "--out", out]
    assert run_cli(*args).returncode == 0
    manifest_path = out / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    old = {k: v for k, v in manifest.items() if k != SEAL_KEY} | {"format_version": 1}
    manifest_path.write_text(json.dumps({**old, SEAL_KEY: manifest_seal(old)}))
    error = one_line_error(run_cli(*args))
    assert f"{manifest_path}: format_version 1" in error and "--overwrite" in error, error
    done = run_cli(*args, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert json.loads(manifest_path.read_text())["format_version"] == manifest["format_version"] > 1
