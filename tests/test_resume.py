"""An interrupted `plora tokenize` leaves nothing that passes as complete, and `--resume`
finishes it with shards byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import run_cli
from packing import pack_rows

import pipeline.tokenize
from parallel.atomic import temp_sibling
from parallel.errors import PloraError, Rejects
from parallel.layout import (
    Packer,
    PackerState,
    PackingOptions,
    PackItem,
    SpecialTokens,
    TokenSequence,
)
from pipeline.shards import JOURNAL_NAME, ShardError, open_shards
from pipeline.tokenize import TokenizeJob, tokenize_to_shards

# Dynamic branch counts and short branches, so that at every shard boundary the packer holds
# pending pieces, a drawn row size and RNG state that the resumed run must restore exactly.
OPTIONS: dict[str, Any] = {"min_branches": 1, "max_branches": 4, "max_seq_len": 24, "seed": 7}
ROWS_PER_SHARD = 4


@pytest.fixture(scope="module")
def big_input(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    """Several hundred records of every kind, from the sample text."""
    paragraphs = [
        p for p in (sample_dir / "sample_text.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()
    ]
    records: list[dict[str, Any]] = []
    for i in range(240):
        text = f"{i}. {paragraphs[i % len(paragraphs)]}"
        if i % 7 == 3:
            records.append(
                {"main": f"Record {i}:", "branches": [text[:80], {"prompt": "So: ", "response": text[80:]}]}
            )
        elif i % 5 == 1:
            chat = [
                {"role": "user", "content": f"Tell me about {i}."},
                {"role": "assistant", "content": text},
            ]
            records.append({"messages": chat})
        else:
            records.append({"text": text})
    path = tmp_path_factory.mktemp("resume") / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def job(source: Path, tokenizer: Path, out: Path, **flags: bool) -> TokenizeJob:
    return TokenizeJob(
        (source,), tokenizer, out, packing=PackingOptions(**OPTIONS), rows_per_shard=ROWS_PER_SHARD, **flags
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, big_input: Path, tiny_model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("reference") / "shards"
    tokenize_to_shards(job(big_input, tiny_model_dir, out), Rejects(), progress=False)
    assert len(open_shards(out).manifest.files) > 40
    return out


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_killed_run_resumes_to_identical_shards(
    plora_bin: Path, big_input: Path, tiny_model_dir: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    cli_options = ["--min-branches", "1", "--max-branches", "4", "--max-seq-len", "24", "--seed", "7"]
    args = [str(plora_bin), "tokenize", str(big_input), "--tokenizer", str(tiny_model_dir), "--out", str(out)]
    args += [*cli_options, "--rows-per-shard", str(ROWS_PER_SHARD)]
    run = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # Kill once a few shards (and the journal after them) are on disk, mid-run.
    while not (out / "shard-00003.arrow").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed; give it more input"
    assert not (out / "manifest.json").exists() and (out / JOURNAL_NAME).exists()
    written = sorted(p.name for p in out.glob("shard-*.arrow"))
    assert 0 < len(written) < len(open_shards(reference).manifest.files)

    with pytest.raises(ShardError, match="incomplete .*--resume"):
        open_shards(out)
    with pytest.raises(PloraError, match="interrupted run .*pass --resume"):
        tokenize_to_shards(job(big_input, tiny_model_dir, out), Rejects(), progress=False)

    resumed = run_cli(*args[1:], "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after" in resumed.stderr
    assert contents(out) == contents(reference)
    open_shards(out)


def test_crash_before_the_first_journal_restarts_cleanly(
    big_input: Path, tiny_model_dir: Path, reference: Path, tmp_path: Path
) -> None:
    """A shard renamed into place but no journal yet, plus a half-written temporary."""
    out = tmp_path / "shards"
    out.mkdir()
    (out / "shard-00000.arrow").write_bytes((reference / "shard-00000.arrow").read_bytes())
    temp_sibling(out / "shard-00001.arrow").write_bytes(b"half a shard")
    with pytest.raises(ShardError, match="incomplete"):
        open_shards(out)
    with pytest.raises(PloraError, match="interrupted run"):
        tokenize_to_shards(job(big_input, tiny_model_dir, out), Rejects(), progress=False)
    tokenize_to_shards(job(big_input, tiny_model_dir, out, resume=True), Rejects(), progress=False)
    assert contents(out) == contents(reference)


def test_resume_with_other_options_is_refused(
    big_input: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real interrupted run: a bad record after the first tokenizer batches stops it after many shards.
    monkeypatch.setattr(pipeline.tokenize, "ENCODE_BATCH", 50)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(big_input.read_text(encoding="utf-8") + "not json\n", encoding="utf-8")
    out = tmp_path / "shards"
    with pytest.raises(PloraError, match=rf"{broken}:\d+"):
        tokenize_to_shards(job(broken, tiny_model_dir, out), Rejects(), progress=False)
    assert (out / JOURNAL_NAME).exists() and not (out / "manifest.json").exists()
    other = TokenizeJob((broken,), tiny_model_dir, out, rows_per_shard=ROWS_PER_SHARD, resume=True)
    with pytest.raises(PloraError, match="other inputs, tokenizer or options; pass --overwrite"):
        tokenize_to_shards(other, Rejects(), progress=False)


def test_packer_restored_at_any_item_continues_exactly() -> None:
    rng = np.random.default_rng(0)
    items = [
        PackItem((TokenSequence.of(rng.integers(3, 50, size=n), True),))
        if n % 4
        else PackItem((TokenSequence.of([5, 6], True),), trunk=TokenSequence.of([7] * (n % 3), True))
        for n in rng.integers(1, 40, size=30)
    ]
    options = PackingOptions(min_branches=1, max_branches=5, max_seq_len=9, seed=3)
    special = SpecialTokens(eos_id=2, bos_id=1)
    whole = list(pack_rows(items, options, special))
    for cut in range(len(items) + 1):
        first = Packer(options, special)
        rows = [row for item in items[:cut] for row in first.add(item)]
        state = first.state()
        state = PackerState(state.pending, state.target, json.loads(json.dumps(state.rng)))  # as journalled
        second = Packer(options, special, state=state)
        rows += [row for item in items[cut:] for row in second.add(item)] + second.finish()
        assert len(rows) == len(whole)
        for a, b in zip(rows, whole, strict=True):
            assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
            assert np.array_equal(a.time_id, b.time_id) and a.num_branches == b.num_branches
