"""Atomic files and directories: an interrupted run never leaves something that looks complete.

Everything plora publishes (shards, manifests, journals, converted JSONL, PNGs, checkpoints,
exported models, the tiny model) is first written under a temporary name in the same directory,
fsynced, and only then renamed to its final name. A rename within one directory is atomic, so a
reader sees the old thing, nothing, or the whole new thing; never half of it. The parent directory
is fsynced too, so the rename itself survives a power cut.

Temporary names are hidden siblings, ``.<name>.<pid>.<random>.tmp``: unique per writer (concurrent
writers never share one), and easy to find again with :func:`temporaries` when a killed run left
one behind. Standard library only, so every part of plora (the trainer on a bare GPU machine too)
can import it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"


def temp_sibling(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (same directory, so renaming it onto ``path`` is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def temporaries(directory: Path, name_pattern: str) -> list[Path]:
    """Temporaries left in ``directory`` by writers of names matching the glob ``name_pattern``."""
    return sorted(directory.glob(f".{name_pattern}.*{TEMP_SUFFIX}"))


@contextmanager
def open_atomic(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit fsync it and rename it to
    ``path``, on an exception remove it (``path`` keeps its old content, or stays absent).
    Text modes use UTF-8."""
    tmp = temp_sibling(path)
    f = open(tmp, mode, encoding=None if "b" in mode else "utf-8")  # noqa: SIM115 - closed below
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        f.close()
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent, the old file, or whole."""
    with open_atomic(path, "wb") as f:
        f.write(data)


def write_text(path: Path, text: str) -> None:
    """:func:`write_bytes` for UTF-8 text."""
    with open_atomic(path, "w") as f:
        f.write(text)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented UTF-8 JSON with a final newline, written atomically."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename into it, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file and directory under ``directory`` (deepest first) and ``directory`` itself,
    before it is published by a rename: files written by other libraries (``save_pretrained``) are
    not synced by them."""
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(directory)


def make_temp_dir(final_dir: Path) -> Path:
    """Create a fresh, empty temporary directory beside ``final_dir`` to build it in."""
    tmp = temp_sibling(final_dir)
    tmp.mkdir()
    return tmp


def publish_dir(tmp_dir: Path, final_dir: Path, *, replace: bool = True) -> None:
    """fsync the finished ``tmp_dir`` and rename it to ``final_dir``, so ``final_dir`` is only ever
    absent or whole.

    With ``replace`` an existing ``final_dir`` is moved aside first (a rename cannot replace a
    non-empty directory) and deleted afterwards. Without it, an absent or empty ``final_dir`` is
    taken and a non-empty one makes the rename fail with :class:`OSError`, leaving ``tmp_dir`` in
    place: that is how a builder learns that a concurrent one got there first. ``final_dir`` is the
    real directory (:func:`parallel.outdir.real_target`): a symlink there would itself be replaced.
    """
    fsync_tree(tmp_dir)
    if replace and final_dir.exists():
        old = temp_sibling(final_dir)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
