"""Issue 10, tokenize items 5, 6, 7, 8, 14 and 19: nothing a record holds is lost or changed without a word.

Each test runs the installed `plora` script where the item is about the command line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import one_line_error, run_cli
from contract_check import check_rows

from parallel.layout import IGNORE_INDEX, PackingOptions
from parallel.tokenizer import load_tokenizer
from pipeline.encode import RecordEncoder
from pipeline.shards import open_shards


def write_records(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def rows_of(out: Path) -> list[Any]:
    shards = open_shards(out)
    return [shards.row(i) for i in range(len(shards))]


def words(count: int) -> str:
    """``count`` tokens of the tiny tokenizer ("the" then " the" are one token each)."""
    return "the" + " the" * (count - 1)


# --------------------------------------------------------------------------------------
# Item 5: a chat template that leaves out the assistant's text
# --------------------------------------------------------------------------------------


def test_item5_template_without_assistant_text_is_a_setup_error(
    tiny_model_dir: Path, sample_dir: Path, tmp_path: Path
) -> None:
    tokenizer = Path(shutil.copytree(tiny_model_dir, tmp_path / "tokenizer"))
    (tokenizer / "chat_template.jinja").write_text(
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['role'] != 'assistant' %}{{- message['content'] }}{%- endif %}"
        "{{- '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    chats = sample_dir / "sample_messages.jsonl"
    for on_error in ("raise", "skip"):  # the template, not a record, is at fault: no reject hides it
        out = tmp_path / f"out-{on_error}"
        done = run_cli("tokenize", chats, "--tokenizer", tokenizer, "--out", out, "--on-error", on_error)
        error = one_line_error(done)
        assert str(tokenizer) in error and "does not render the assistant's text" in error, error
        assert f"{chats}:1" in error, error
        assert not (out / "manifest.json").exists()


# --------------------------------------------------------------------------------------
# Item 6: a trunk longer than --max-seq-len
# --------------------------------------------------------------------------------------


def test_item6_trunk_longer_than_max_seq_len_is_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    records = write_records(
        tmp_path / "records.jsonl",
        [{"main": "Q: " + words(30), "branches": ["a", "b"]}, {"main": "Q:", "branches": ["c", "d"]}],
    )
    args = ["tokenize", records, "--tokenizer", tiny_model_dir, "--max-seq-len", 16]
    error = one_line_error(run_cli(*args, "--out", tmp_path / "raise"))
    assert error.startswith(f"plora: error: {records}:1: trunk ('main') longer than --max-seq-len"), error
    assert "every branch must see it whole" in error and "at most 16 fit" in error

    out = tmp_path / "skip"
    done = run_cli(*args, "--out", out, "--on-error", "skip")
    assert done.returncode == 0, done.stderr
    assert "2 records in, 1 out, 1 rejected" in done.stderr
    (entry,) = [json.loads(line) for line in Path(f"{out}.rejects.jsonl").read_text().splitlines()]
    assert entry["line"] == 1 and entry["reason"].startswith("trunk ('main') longer than --max-seq-len")
    # only the short trunk ("Q:") made a row; its last token starts the branches (docs/layout.md)
    assert [r.trunk_len for r in rows_of(out)] == [1]


def test_item6_train_advice_names_a_max_seq_len_that_fits(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    # A trunk and a branch of 200 tokens each (both within --max-seq-len; the branch is its start
    # token, 198 words and EOS) reach time 400 > 256.
    records = write_records(tmp_path / "records.jsonl", [{"main": words(200), "branches": [words(198)]}])
    shards = tmp_path / "shards"
    tokenize = ["tokenize", records, "--tokenizer", model, "--out", shards, "--max-seq-len", 200]
    assert run_cli(*tokenize).returncode == 0
    train = ["train", "--shards", shards, "--base-model", model, "--out-dir", tmp_path / "run"]
    error = one_line_error(run_cli(*train, "--dtype", "float32"))
    assert "max_position_embeddings 256" in error and "--max-seq-len at most 128" in error, error


# --------------------------------------------------------------------------------------
# Item 7: options that would be ignored; parallel records wider than --max-branches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--min-branches", "3"], ["--min-branches", "--max-branches"]),
        (["--branches", "4", "--max-branches", "7"], ["--branches", "--max-branches"]),
        (["--branches_per_sample", "4", "--max_branches_per_sample", "7"], ["--branches", "--max-branches"]),
    ],
    ids=["min-alone", "branches-and-max", "guide-spellings"],
)
def test_item7_contradictory_or_incomplete_branch_options_are_an_error(
    tiny_model_dir: Path,
    sample_dir: Path,
    tmp_path: Path,
    flags: list[str],
    named: list[str],
) -> None:
    out = tmp_path / "out"
    error = one_line_error(
        run_cli(
            "tokenize",
            sample_dir / "sample_text.txt",
            "--tokenizer",
            tiny_model_dir,
            "--out",
            out,
            *flags,
        )  # fmt: skip
    )
    assert all(flag in error for flag in named), error
    assert not out.exists()


ELEVEN = {"main": "Five ways to save energy:", "branches": [f"Idea {i}: turn it off." for i in range(11)]}


def test_item7_wide_parallel_record_is_split_into_rows_of_max_branches(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    records = write_records(tmp_path / "records.jsonl", [ELEVEN])
    out = tmp_path / "out"
    done = run_cli("tokenize", records, "--tokenizer", tiny_model_dir, "--out", out,
                   "--min-branches", 2, "--max-branches", 7)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1 parallel records wider than --max-branches 7 split into 2 rows" in done.stderr
    rows = rows_of(out)
    assert [r.num_branches for r in rows] == [7, 4]
    (ids, labels), (again, unlabelled) = [
        (r.input_ids[r.branch_id == 0], r.labels[r.branch_id == 0]) for r in rows
    ]
    assert ids.tolist() == again.tolist()  # the same trunk in both rows, trained in the first only
    assert (labels[:-1] != IGNORE_INDEX).all() and (unlabelled == IGNORE_INDEX).all()
    packing = open_shards(out).manifest.packing
    check_rows(rows, [ELEVEN], load_tokenizer(tiny_model_dir), packing)  # every branch, each token once


def test_item7_fixed_mode_keeps_a_wide_record_whole_and_says_so(tiny_model_dir: Path, tmp_path: Path) -> None:
    records = write_records(tmp_path / "records.jsonl", [ELEVEN])
    out = tmp_path / "out"
    done = run_cli("tokenize", records, "--tokenizer", tiny_model_dir, "--out", out, "--branches", 4)
    assert done.returncode == 0, done.stderr
    assert "1 parallel rows above --branches 4" in done.stderr, done.stderr
    assert [r.num_branches for r in rows_of(out)] == [11]


# --------------------------------------------------------------------------------------
# Item 8: the manifest's packing facts are verified
# --------------------------------------------------------------------------------------


@pytest.fixture
def left_aligned(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """Shards of one parallel record whose branches differ in length (left-aligned)."""
    records = write_records(tmp_path / "records.jsonl", [{"main": "Q:", "branches": ["a", words(9)]}])
    out = tmp_path / "shards"
    done = run_cli("tokenize", records, "--tokenizer", tiny_model_dir, "--out", out)
    assert done.returncode == 0, done.stderr
    return out


def edit_align(shards: Path, *, reseal: bool) -> Path:
    from pipeline.shards import SEAL_KEY, manifest_seal

    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["packing"]["align"] = "right"
    if reseal:
        manifest[SEAL_KEY] = manifest_seal(manifest)
    path.write_text(json.dumps(manifest))
    return path


def test_item8_edited_align_is_refused(tiny_model_dir: Path, left_aligned: Path) -> None:
    manifest = edit_align(left_aligned, reseal=False)
    error = one_line_error(run_cli("inspect", left_aligned))
    assert error.startswith(f"plora: error: {manifest}: changed after plora tokenize wrote it"), error
    error = one_line_error(
        run_cli("eval", "--shards", left_aligned, "--base-model", tiny_model_dir, "--dtype", "float32")
    )
    assert str(manifest) in error, error


def test_item8_packing_facts_that_contradict_the_rows_are_refused(left_aligned: Path) -> None:
    manifest = edit_align(left_aligned, reseal=True)  # as if the writer itself had got it wrong
    error = one_line_error(run_cli("inspect", left_aligned))
    assert f"{manifest}: says align 'right', but the branches of a row do not end together" in error, error


def test_item8_manifest_without_seal_is_refused(left_aligned: Path) -> None:
    path = left_aligned / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["manifest_sha256"]  # an edit that dropped it
    path.write_text(json.dumps(manifest))
    error = one_line_error(run_cli("inspect", left_aligned))
    assert error.startswith(f"plora: error: {path}: has no manifest_sha256"), error


# --------------------------------------------------------------------------------------
# Item 14: memory follows the largest record, not a hundred times it
# --------------------------------------------------------------------------------------


def peak_rss_bytes(plora_bin: Path, *args: object) -> int:
    """Peak resident memory of one `plora` run, measured in a fresh parent that has no other child."""
    probe = (
        "import resource, subprocess, sys\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "assert done.returncode == 0, done.stderr\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(plora_bin), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout) * 1024  # Linux reports KiB


@pytest.mark.slow
def test_item14_peak_memory_is_a_small_multiple_of_the_largest_record(
    plora_bin: Path, tiny_model_dir: Path, sample_dir: Path, tmp_path: Path
) -> None:
    vocabulary = (sample_dir / "sample_text.txt").read_text().split()
    text = " ".join(vocabulary[i % len(vocabulary)] for i in range(500_000))  # about 3 MB
    big = write_records(tmp_path / "big.jsonl", [{"text": text}])
    small = write_records(tmp_path / "small.jsonl", [{"text": "a short record"}])
    common = ["tokenize", "--tokenizer", tiny_model_dir, "--no-progress"]
    baseline = peak_rss_bytes(plora_bin, *common, small, "--out", tmp_path / "small")
    peak = peak_rss_bytes(plora_bin, *common, big, "--out", tmp_path / "big")
    record = big.stat().st_size
    # Tokenizing the record whole took about 125 times its size; pieces, rows and the shard ~25.
    assert peak - baseline < 50 * record, (peak - baseline) / record


def test_item14_long_texts_tokenized_in_pieces_give_the_texts_tokens(
    tiny_model_dir: Path, sample_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.encode

    monkeypatch.setattr(pipeline.encode, "LONG_TEXT", 1024)  # many cuts in a small text
    tokenizer = load_tokenizer(tiny_model_dir)
    encoder = RecordEncoder(tokenizer, PackingOptions())
    text = (sample_dir / "sample_text.txt").read_text() * 4
    text = text.replace(". ", ".  \n \t").replace("the ", "the\n\n   ")  # odd whitespace at cuts
    assert len(encoder._cuts(text)) > 10
    ((ids, offsets),) = encoder._encode([text], offsets=True)
    whole = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    assert ids.tolist() == whole.ids and [tuple(o) for o in offsets.tolist()] == whole.offsets


# --------------------------------------------------------------------------------------
# Item 19: the summary says what packing changed; an empty branch
# --------------------------------------------------------------------------------------


def test_item19_summary_counts_branches_split_for_length(tiny_model_dir: Path, tmp_path: Path) -> None:
    texts = [{"text": words(40)}, {"text": words(20)}, {"text": "short"}]
    records = write_records(tmp_path / "records.jsonl", texts)
    out = tmp_path / "out"
    done = run_cli("tokenize", records, "--tokenizer", tiny_model_dir, "--out", out,
                   "--max-seq-len", 16, "--branches", 2)  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = re.search(r"(\d+) branches longer than --max-seq-len 16 split into (\d+) pieces", done.stderr)
    assert found, done.stderr
    branches = sum(r.num_branches for r in rows_of(out))
    # 41 tokens (with EOS) -> 3 pieces, 21 -> 2, and "short" stays whole
    assert (int(found[1]), int(found[2])) == (2, branches - 1)


def test_item19_empty_branch_error_names_the_branch_and_the_option(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    records = write_records(
        tmp_path / "records.jsonl",
        [{"main": "Q:", "branches": ["a", {"prompt": "p", "response": "b"}, {"response": " "}]}],
    )
    error = one_line_error(
        run_cli("tokenize", records, "--tokenizer", tiny_model_dir, "--out", tmp_path / "out")
    )
    assert f"{records}:1:" in error and "branch 2 'response' is empty" in error, error
    assert "rejects the whole parallel record" in error and "--drop-empty-branches" in error, error

    out = tmp_path / "dropped"
    done = run_cli("tokenize", records, "--tokenizer", tiny_model_dir, "--out", out,
                   "--drop-empty-branches")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1 records in, 1 out, 0 rejected" in done.stderr and "1 empty branches dropped" in done.stderr
    assert [r.num_branches for r in rows_of(out)] == [2]


def test_item19_summary_counts_survive_resume(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.tokenize
    from parallel.errors import Rejects
    from pipeline.tokenize import TokenizeJob, tokenize_to_shards

    records = [ELEVEN if i % 3 == 0 else {"text": words(10 + i)} for i in range(30)]
    source = write_records(tmp_path / "records.jsonl", records)
    packing = PackingOptions(min_branches=1, max_branches=4, max_seq_len=16, seed=1)

    def run(out: Path, resume: bool = False) -> list[str]:
        job = TokenizeJob((source,), tiny_model_dir, out, packing=packing, rows_per_shard=3, resume=resume)
        return tokenize_to_shards(job, Rejects(), progress=False).notes

    whole = run(tmp_path / "whole")
    assert len(whole) == 2  # branches split for length, and wide records split
    write_shard = pipeline.tokenize.write_shard

    def interrupted(directory: Path, index: int, rows: Any) -> dict[str, Any]:
        if index == 4:
            raise KeyboardInterrupt
        return write_shard(directory, index, rows)

    monkeypatch.setattr(pipeline.tokenize, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.setattr(pipeline.tokenize, "write_shard", write_shard)
    assert run(tmp_path / "resumed", resume=True) == whole
