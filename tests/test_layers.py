"""The packages form layers, cli > trainer > pipeline > parallel: each imports only the ones below it.

The one documented exception is the guide's entry point trainer/train_hf_parallel_lora.py, a thin
script over cli/ kept at the path the guide's users run.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("parallel", "pipeline", "trainer", "cli")
EXCEPTIONS = {("trainer/train_hf_parallel_lora.py", "cli")}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in ``path``, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def upward_imports() -> list[str]:
    upward = []
    for rank, layer in enumerate(LAYERS):
        for path in sorted((ROOT / layer).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            for line, package in imported_packages(path):
                if package in LAYERS[rank + 1 :] and (where, package) not in EXCEPTIONS:
                    upward.append(f"{where}:{line} imports {package} (above {layer})")
    return upward


def test_no_layer_imports_a_layer_above_it() -> None:
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path: Path, monkeypatch) -> None:
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "parallel" / "bad.py").write_text("def f():\n    from trainer.loop import train\n")
    (tmp_path / "cli" / "fine.py").write_text("import parallel.layout\nfrom pipeline import shards\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert upward_imports() == ["parallel/bad.py:2 imports trainer (above parallel)"]
