"""Shared by the output-directory tests: snapshots, a full disk, another writer holding the lock."""

from __future__ import annotations

import fcntl
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def tree(directory: Path) -> dict[str, bytes | None]:
    """Every entry under ``directory`` (hidden ones too) with a file's bytes: a snapshot to compare."""
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
        for p in sorted(directory.rglob("*"))
    }


def user_dir(path: Path) -> Path:
    """A directory the user has: a file and a subdirectory."""
    (path / "sub").mkdir(parents=True)
    (path / "a").write_text("mine\n")
    return path


def small_disk(limit: int) -> Callable[[], None]:
    """A full disk, as a subprocess sees it: files may not grow past ``limit`` bytes (EFBIG)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def run_on_small_disk(
    plora_bin: Path, limit: int, *args: object, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`plora ARGS...` as :func:`cli_helpers.run_plora` runs it, on a disk that fills up at ``limit``."""
    return subprocess.run(
        [str(plora_bin), *map(str, args)],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=small_disk(limit),
    )


@contextmanager
def held_lock(out: Path) -> Iterator[None]:
    """Another plora process writing ``out``, as far as the lock is concerned."""
    from parallel.outdir import lock_path

    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


def no_temporaries(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")], list(directory.iterdir())
