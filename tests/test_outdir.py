"""Output directories of export, tiny-model and tokenize (issue 10 items 1, 2, 13): nothing the user
has is emptied, protected paths are refused, symlinks are followed, a second writer stops at once, and
a failed write names the user's path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_cli
from outdir_helpers import held_lock, no_temporaries, run_on_small_disk, tree, user_dir


@pytest.fixture
def adapter(one_step_adapter: Path) -> Path:
    """A trained adapter in its own --out-dir; tests must leave it whole."""
    return one_step_adapter


# ---- item 1: export ----------------------------------------------------------------------------------


def test_item1_export_refuses_a_directory_plora_did_not_write(adapter: Path, tmp_path: Path) -> None:
    out = user_dir(tmp_path / "K")
    before = tree(out)
    line = one_line_error(run_cli("export", "--adapter", adapter, "--out", out, "--merge"))
    assert str(out) in line and "--overwrite" in line
    assert tree(out) == before
    no_temporaries(tmp_path)


@pytest.mark.slow
def test_item1_item13_export_overwrite_replaces_only_a_whole_model(
    adapter: Path, plora_bin: Path, tmp_path: Path
) -> None:
    out = user_dir(tmp_path / "K")
    before = tree(out)
    # item 13 too: the disk fills up while the model is written; the user's directory is untouched
    failed = run_on_small_disk(plora_bin, 50_000, "export", "--adapter", adapter, "--out", out, "--overwrite")
    line = one_line_error(failed)
    assert line.startswith(f"plora: error: {out}: cannot write the exported model: ") and ".tmp" not in line
    assert tree(out) == before
    no_temporaries(tmp_path)

    done = run_cli("export", "--adapter", adapter, "--out", out, "--overwrite", "--merge")
    assert done.returncode == 0, done.stderr
    assert (out / "plora.json").is_file() and not (out / "a").exists()
    no_temporaries(tmp_path)


@pytest.mark.parametrize("where", ["the adapter", "holds the adapter", "in the base model", "cwd", "home"])
def test_item1_export_refuses_protected_paths_even_with_overwrite(
    where: str, adapter: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    out: Path | str = {
        "the adapter": adapter,
        "holds the adapter": adapter.parent,
        "in the base model": tiny_model_dir / "sub",
        "cwd": ".",
        "home": tmp_path / "home",
    }[where]
    (tmp_path / "home").mkdir()
    watched = [adapter, tiny_model_dir, cwd]
    before = [tree(path) for path in watched]
    done = run_cli(
        "export", "--adapter", adapter, "--out", out, "--overwrite",
        cwd=cwd, env={"HOME": str(tmp_path / "home")},
    )  # fmt: skip
    line = one_line_error(done)
    assert f"--out {out}: " in line and "choose another --out" in line
    assert [tree(path) for path in watched] == before


def test_item1_export_follows_a_symlinked_out(adapter: Path, tmp_path: Path) -> None:
    target = tmp_path / "models" / "real"
    target.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(target)
    for extra in ([], ["--overwrite"]):  # into the empty target, then replacing that export
        done = run_cli("export", "--adapter", adapter, "--out", link, *extra)
        assert done.returncode == 0, done.stderr
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert (target / "plora.json").is_file()
        no_temporaries(tmp_path)
        no_temporaries(target.parent)


def test_item1_export_stops_while_another_writer_holds_the_out(adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    with held_lock(out):
        line = one_line_error(run_cli("export", "--adapter", adapter, "--out", out))
    assert str(out) in line and "another plora process" in line
    assert not out.exists()


# ---- item 1 / 13: tiny-model -------------------------------------------------------------------------


def test_item1_tiny_model_overwrite_and_protected_paths(tmp_path: Path) -> None:
    out = user_dir(tmp_path / "model")
    assert str(out) in one_line_error(run_cli("tiny-model", "--out", out))
    assert (out / "a").is_file()
    here = run_cli("tiny-model", "--out", ".", "--overwrite", cwd=out)
    line = one_line_error(here)
    assert "--out .: is the current working directory" in line
    assert (out / "a").is_file()

    done = run_cli("tiny-model", "--out", out, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (out / "config.json").is_file() and not (out / "a").exists()
    weights = (out / "model.safetensors").stat().st_mtime_ns
    again = run_cli("tiny-model", "--out", out)  # the same build: reused
    assert again.returncode == 0 and (out / "model.safetensors").stat().st_mtime_ns == weights
    no_temporaries(tmp_path)


@pytest.mark.slow
def test_item13_tiny_model_on_a_full_disk_names_the_users_path(plora_bin: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    line = one_line_error(run_on_small_disk(plora_bin, 50_000, "tiny-model", "--out", out))
    assert line.startswith(f"plora: error: {out}: cannot write the tiny model: File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- item 1 / 2: tokenize -----------------------------------------------------------------------------


def tokenize_args(sample_dir: Path, model: Path, out: Path | str, *extra: object) -> list[object]:
    return ["tokenize", sample_dir / "sample_parallel.jsonl", "--tokenizer", model, "--out", out,
            "--max-seq-len", "48", *extra]  # fmt: skip


def test_item1_tokenize_refuses_a_foreign_directory_unless_overwrite(
    tiny_model_dir: Path, sample_dir: Path, tmp_path: Path
) -> None:
    out = user_dir(tmp_path / "shards")
    line = one_line_error(run_cli(*tokenize_args(sample_dir, tiny_model_dir, out)))
    assert str(out) in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == ["a", "sub"]

    done = run_cli(*tokenize_args(sample_dir, tiny_model_dir, out, "--overwrite"))
    assert done.returncode == 0, done.stderr
    assert (out / "manifest.json").is_file() and (out / "a").read_text() == "mine\n"  # writes beside, keeps


@pytest.mark.parametrize("where", ["holds an input", "cwd"])
def test_item1_tokenize_refuses_protected_paths(
    where: str, tiny_model_dir: Path, sample_dir: Path, tmp_path: Path
) -> None:
    records = tmp_path / "data" / "records.jsonl"
    records.parent.mkdir()
    records.write_bytes((sample_dir / "sample_parallel.jsonl").read_bytes())
    cwd = tmp_path / "work"
    cwd.mkdir()
    out = records.parent if where == "holds an input" else "."
    args = ["tokenize", records, "--tokenizer", tiny_model_dir, "--out", out, "--overwrite"]
    line = one_line_error(run_cli(*args, cwd=cwd))
    assert f"--out {out}: " in line
    assert sorted(p.name for p in records.parent.iterdir()) == ["records.jsonl"]
    assert list(cwd.iterdir()) == []


def test_item2_second_tokenize_into_one_out_stops_at_once(
    tiny_model_dir: Path, sample_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    with held_lock(out):
        done = run_cli(*tokenize_args(sample_dir, tiny_model_dir, out, "--branches", 2))
    line = one_line_error(done)
    assert str(out) in line and "another plora process" in line
    assert not out.exists()


@pytest.mark.slow
def test_item11_tokenize_on_a_full_disk_names_the_shard_directory(
    tiny_model_dir: Path, sample_dir: Path, plora_bin: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    done = run_on_small_disk(plora_bin, 3_000, *tokenize_args(sample_dir, tiny_model_dir, out))
    line = one_line_error(done)
    assert line == f"plora: error: {out}: cannot write the shards: File too large"
