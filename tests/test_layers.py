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


MAX_FUNCTION_LINES = 80
SHORT_FUNCTION_LAYERS = ("parallel", "pipeline", "trainer")  # cli's commands are mostly option lists


def long_functions(root: Path) -> list[str]:
    """Functions of the library layers that run to MAX_FUNCTION_LINES lines or more."""
    found = []
    for layer in SHORT_FUNCTION_LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                    if lines >= MAX_FUNCTION_LINES:
                        found.append(
                            f"{path.relative_to(root).as_posix()}:{node.lineno} {node.name} ({lines})"
                        )
    return found


def test_library_functions_stay_under_80_lines() -> None:
    assert long_functions(ROOT) == []


def test_the_length_check_sees_a_long_function(tmp_path: Path) -> None:
    (tmp_path / "trainer").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "trainer" / "long.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}")
    assert long_functions(tmp_path) == [f"trainer/long.py:5 long ({MAX_FUNCTION_LINES + 1})"]
