"""Running the installed `plora` script as a user does, and the one-line error bad input must give."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path


def run_plora(
    plora_bin: Path,
    *args: object,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: int = 120,
) -> subprocess.CompletedProcess[str]:
    """`plora ARGS...` in a real subprocess; rich output as wide as a roomy terminal (no wrapped lines)."""
    return subprocess.run(
        [str(plora_bin), *map(str, args)],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """Assert that the run failed as bad input must (exit status 2, exactly one line ``plora: error: ...``
    on stderr, no traceback) and return that line."""
    assert done.returncode == 2, (done.stdout or "") + done.stderr
    assert done.stderr.startswith("plora: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.endswith("\n"), done.stderr
    return done.stderr.rstrip("\n")
