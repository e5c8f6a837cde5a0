"""Facts about the repository as a whole: no merge left half done, and a CLI that starts quickly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".cfg", ".txt", ".jsonl"}
CONFLICT = re.compile(r"^(<<<<<<<|>>>>>>>) ", re.MULTILINE)


def test_no_tracked_file_holds_merge_conflict_markers() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    texts = [
        ROOT / name for name in tracked.stdout.split() if Path(name).suffix in TEXT or name == "Makefile"
    ]
    marked = [p.name for p in texts if CONFLICT.search(p.read_text(encoding="utf-8", errors="replace"))]
    assert marked == []


def test_the_cli_starts_without_torch() -> None:
    """`plora --help` and option parsing must not pay torch's import (seconds): it loads where it is used."""
    code = "import sys, cli.main; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
