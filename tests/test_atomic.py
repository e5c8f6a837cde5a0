"""Atomic files and directories: the final name only ever holds the old thing or the whole new one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parallel import atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    atomic.write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic.open_atomic(path, "w") as f:
        f.write("half of the new")
        raise RuntimeError("killed midway")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]

    atomic.write_json(path, {"ü": 1})
    assert json.loads(path.read_text(encoding="utf-8")) == {"ü": 1}
    assert atomic.temporaries(tmp_path, "out.jsonl") == []


def test_temporaries_are_hidden_unique_siblings_found_by_pattern(tmp_path: Path) -> None:
    shard = tmp_path / "shard-00001.arrow"
    first, second = atomic.temp_sibling(shard), atomic.temp_sibling(shard)
    assert first != second and first.parent == tmp_path and first.name.startswith(".shard-00001.arrow.")
    first.write_bytes(b"left by a killed run")
    shard.write_bytes(b"published")
    assert atomic.temporaries(tmp_path, "shard-*.arrow") == [first]


def test_publish_replaces_a_whole_directory(tmp_path: Path) -> None:
    final = tmp_path / "adapter"
    for content in ("first", "second"):
        tmp = atomic.make_temp_dir(final)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights").write_text(content)
        atomic.publish_dir(tmp, final)
        assert (final / "sub" / "weights").read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_publish_without_replace_refuses_a_taken_directory(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()  # empty: may be taken
    tmp = atomic.make_temp_dir(final)
    (tmp / "a").write_text("mine")
    atomic.publish_dir(tmp, final, replace=False)
    assert (final / "a").read_text() == "mine"

    loser = atomic.make_temp_dir(final)
    (loser / "a").write_text("theirs")
    with pytest.raises(OSError):
        atomic.publish_dir(loser, final, replace=False)
    assert (final / "a").read_text() == "mine" and loser.is_dir()
