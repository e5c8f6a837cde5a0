"""Bad input through `plora convert` (in-process, by its console entry point), in both --on-error modes.

Every bad record ends either in exactly one stderr line ``plora: error: FILE:LINE: ...`` with
exit status 2 and no output file, or (``--on-error skip``) in one counted entry of the rejects
file while the good records are written. Bad files and arguments are one-line errors in both
modes. Common quirks (BOM, CRLF, blank lines, huge lines, empty files) are accepted.
"""

from __future__ import annotations

import gzip
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_cli
from inputs import read_jsonl

OK = b'{"text": "fine"}\n'
ALPACA_OK = b'{"instruction": "Say hi.", "output": "Hi."}\n'


@dataclass(frozen=True)
class BadRecord:
    """A file whose record at ``line`` is bad; the rest (``good`` records) is fine."""

    name: str
    filename: str
    content: bytes
    line: int
    expect: str  # part of the reason
    good: int = 1
    args: tuple[str, ...] = ()


BAD_RECORDS = [
    BadRecord("invalid JSON", "a.jsonl", OK + b'{"text": "cut\n', 2, "invalid JSON"),
    BadRecord("truncated JSON array", "a.json", b'[\n {"text": "fine"},\n {"text": ', 3, "invalid JSON"),
    BadRecord("not an object", "a.jsonl", OK + b"[1, 2]\n", 2, "not an object: got a JSON list"),
    BadRecord("wrong type of text", "a.jsonl", OK + b'{"text": 5}\n', 2, "wrong type: 'text' is a number"),
    BadRecord("wrong type of messages", "a.jsonl", OK + b'{"messages": "hi"}\n', 2, "wrong type: 'messages'"),
    BadRecord(
        "missing turn fields",
        "a.jsonl",
        OK + b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}\n',
        2,
        "missing field: turn 0 needs 'role' and 'content'",
    ),
    BadRecord(
        "missing field for a forced format",
        "a.jsonl",
        ALPACA_OK + b'{"instruction": "Do it.", "input": ""}\n',
        2,
        "missing field: 'output'",
        args=("--format", "alpaca"),
    ),
    BadRecord("unknown format", "a.jsonl", OK + b'{"foo": 1}\n', 2, "unknown format: keys ['foo']"),
    BadRecord("empty text", "a.jsonl", OK + b'{"text": ""}\n', 2, "empty text: 'text' is empty"),
    BadRecord("whitespace text", "a.jsonl", OK + b'{"text": " \\t\\n "}\n', 2, "empty text"),
    BadRecord(
        "empty assistant turn",
        "a.jsonl",
        OK + b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]}\n',
        2,
        "empty text: turn 1 (assistant) is empty",
    ),
    BadRecord(
        "unknown role",
        "a.jsonl",
        OK + b'{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
        2,
        "unknown role: turn 0 has role 'tool'",
    ),
    BadRecord(
        "chat without an assistant",
        "a.jsonl",
        OK + b'{"messages": [{"role": "user", "content": "hello?"}]}\n',
        2,
        "chat has no assistant message",
    ),
    BadRecord(
        "empty branches",
        "a.jsonl",
        OK + b'{"main": "m", "branches": []}\n',
        2,
        "'branches' must be a non-empty",
    ),
    BadRecord(
        "text and messages at once",
        "a.jsonl",
        OK + b'{"text": "t", "messages": [{"role": "assistant", "content": "x"}]}\n',
        2,
        "ambiguous record: keys ['messages', 'text'] hold text and messages records at once",
    ),
    BadRecord(
        "parallel record with text",
        "a.jsonl",
        OK + b'{"main": "m", "branches": ["b"], "text": "t"}\n',
        2,
        "ambiguous record: keys ['branches', 'main', 'text'] hold text and parallel records",
    ),
    BadRecord(
        "canonical parallel record with text",
        "a.jsonl",
        OK + b'{"main": "m", "branches": ["b"], "text": "t"}\n',
        2,
        "keys ['branches', 'main', 'text'] mix text and parallel records",
        args=("--format", "canonical"),
    ),
    BadRecord("invalid UTF-8 in JSON Lines", "a.jsonl", OK + b'{"text": "caf\xe9"}\n', 2, "invalid UTF-8"),
    BadRecord("invalid UTF-8 in text", "a.txt", b"fine\n\nbad \xff\xfe block\n", 3, "invalid UTF-8"),
    BadRecord("invalid UTF-8 in CSV", "a.csv", b"text\nfine\nbad \xc3\n", 3, "invalid UTF-8"),
    BadRecord(
        "CSV row with too many cells", "a.csv", b"text\nfine\nx,y\n", 3, "wrong number of CSV cells: got 2"
    ),
]


def assert_one_line_error(done: subprocess.CompletedProcess[str], start: str, expect: str) -> None:
    line = one_line_error(done)
    assert line.startswith(f"plora: error: {start}") and expect in line, line


@pytest.mark.parametrize("case", BAD_RECORDS, ids=lambda c: c.name)
def test_bad_record_raise_is_one_line(tmp_path: Path, case: BadRecord) -> None:
    (tmp_path / case.filename).write_bytes(case.content)
    done = run_cli("convert", case.filename, "--out", "out.jsonl", *case.args, cwd=tmp_path)
    assert_one_line_error(done, f"{case.filename}:{case.line}: ", case.expect)
    assert not (tmp_path / "out.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [case.filename]  # no temporary file left either


@pytest.fixture(scope="module")
def skipped_run(tmp_path_factory) -> dict[tuple[str, ...], tuple]:
    """One `--on-error skip` run per distinct argument set over all bad files at once:
    args -> (run, records written, rejects)."""
    runs = {}
    for args in dict.fromkeys(case.args for case in BAD_RECORDS):
        tmp = tmp_path_factory.mktemp("skip")
        names = []
        for index, case in enumerate(BAD_RECORDS):
            if case.args == args:
                names.append(f"{index:02d}-{case.filename}")
                (tmp / names[-1]).write_bytes(case.content)
        skip = ("--out", "out.jsonl", "--on-error", "skip", *args)
        done = run_cli("convert", *names, *skip, cwd=tmp)
        rejects = read_jsonl(tmp / "out.rejects.jsonl") if done.returncode == 0 else []
        written = read_jsonl(tmp / "out.jsonl") if done.returncode == 0 else []
        runs[args] = (done, written, rejects)
    return runs


@pytest.mark.parametrize("case", BAD_RECORDS, ids=lambda c: c.name)
def test_bad_record_skip_is_a_counted_reject(skipped_run, case: BadRecord) -> None:
    done, _, rejects = skipped_run[case.args]
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    name = f"{BAD_RECORDS.index(case):02d}-{case.filename}"
    [entry] = [e for e in rejects if e["source"] == name]
    assert entry["line"] == case.line
    assert case.expect in entry["reason"]
    assert f"  {name}: {case.good + 1} in, {case.good} out, 1 rejected\n" in done.stderr


def test_skip_run_totals_add_up(skipped_run) -> None:
    for args, (done, written, rejects) in skipped_run.items():
        cases = [c for c in BAD_RECORDS if c.args == args]
        good = sum(c.good for c in cases)
        assert f"{good + len(cases)} records in, {good} out, {len(cases)} rejected" in done.stderr
        assert (len(written), len(rejects)) == (good, len(cases))


def _corrupt_gzip(tmp: Path) -> list[str]:
    (tmp / "a.jsonl.gz").write_bytes(b"this is not gzip data")
    return ["a.jsonl.gz", "--out", "out.jsonl"]


def _corrupt_parquet(tmp: Path) -> list[str]:
    (tmp / "a.parquet").write_bytes(b"PAR1 but not really a parquet file")
    return ["a.parquet", "--out", "out.jsonl"]


def _with_input(tmp: Path, *args: str) -> list[str]:
    (tmp / "a.jsonl").write_bytes(OK)
    (tmp / "a_file").write_bytes(b"")
    (tmp / "a_dir").mkdir()
    return ["a.jsonl", *args]


# (name, set-up returning the arguments after `convert`, what the one line must start with and contain)
BAD_FILES = [
    ("missing file", lambda tmp: ["nope.jsonl", "--out", "out.jsonl"], "nope.jsonl: no such file"),
    (
        "directory as input",
        lambda tmp: _with_input(tmp, "a_dir", "--out", "out.jsonl"),
        "a_dir: is a directory",
    ),
    (
        "unsupported suffix",
        lambda tmp: _with_input(tmp, "a_file", "--out", "out.jsonl"),
        "a_file: unsupported input",
    ),
    ("corrupt gzip", _corrupt_gzip, "a.jsonl.gz: cannot read"),
    ("corrupt parquet", _corrupt_parquet, "a.parquet: not a readable Parquet file"),
    (
        "unwritable output",
        lambda tmp: _with_input(tmp, "--out", "a_file/out.jsonl"),
        "a_file/out.jsonl: cannot write",
    ),
    ("output is a directory", lambda tmp: _with_input(tmp, "--out", "a_dir"), "a_dir: is a directory"),
    ("no input", lambda tmp: ["--out", "out.jsonl"], "no input"),
    (
        "unknown format option",
        lambda tmp: _with_input(tmp, "--format", "yaml"),
        "--format must be one of auto, alpaca",
    ),
    ("unknown option", lambda tmp: _with_input(tmp, "--frmat", "auto"), "No such option: --frmat"),
]


@pytest.mark.parametrize("mode", ["raise", "skip"])
@pytest.mark.parametrize("case", BAD_FILES, ids=lambda c: c[0])
def test_bad_file_is_one_line_in_both_modes(tmp_path: Path, case, mode: str) -> None:
    _, setup, expect = case
    args = setup(tmp_path)
    if mode == "skip" and "--out" not in args and "--frmat" not in args:
        args += ["--rejects", "r.jsonl"]
    done = run_cli("convert", *args, "--on-error", mode, cwd=tmp_path)
    assert_one_line_error(done, "", expect)
    assert not (tmp_path / "out.jsonl").exists()


def test_unwritable_rejects_file_is_one_line(tmp_path: Path) -> None:
    args = _with_input(tmp_path, "--out", "out.jsonl", "--on-error", "skip", "--rejects", "a_file/r.jsonl")
    done = run_cli("convert", *args, cwd=tmp_path)
    assert_one_line_error(done, "a_file/r.jsonl: cannot write: a_file is not a directory", "")


def test_skip_to_stdout_without_rejects_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(OK)
    done = run_cli("convert", "a.jsonl", "--on-error", "skip", cwd=tmp_path)
    assert_one_line_error(done, "", "needs --rejects FILE")


# --------------------------------------------------------------------------------------
# Quirks that are not errors
# --------------------------------------------------------------------------------------


ACCEPTED = [
    (
        "BOM and CRLF in JSON Lines",
        "a.jsonl",
        b'\xef\xbb\xbf{"text": "x"}\r\n\r\n{"text": "y"}\r\n',
        ["x", "y"],
    ),
    ("BOM and CRLF in JSON", "a.json", b'\xef\xbb\xbf[{"text": "x"},\r\n{"text": "y"}]\r\n', ["x", "y"]),
    ("BOM and CRLF in CSV", "a.csv", b'\xef\xbb\xbftext\r\nx\r\n"y\r\nz"\r\n', ["x", "y\r\nz"]),
    ("BOM and CRLF in text", "a.txt", b"\xef\xbb\xbfx\r\n\r\ny\r\nz\r\n", ["x", "y\nz"]),
    ("blank lines between records", "a.jsonl", b'\n{"text": "x"}\n  \n\t\n{"text": "y"}\n\n', ["x", "y"]),
    ("empty file", "a.jsonl", b"", []),
    ("empty JSON array", "a.json", b"[]", []),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda c: c[0])
def test_quirks_are_accepted(tmp_path: Path, case) -> None:
    _, filename, content, texts = case
    (tmp_path / filename).write_bytes(content)
    done = run_cli("convert", filename, "--out", "out.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [{"text": t} for t in texts]
    assert f"{len(texts)} records in, {len(texts)} out, 0 rejected" in done.stderr
    if not texts:
        assert f"{filename}: 0 in, 0 out, 0 rejected (no records found)" in done.stderr


def test_ten_megabyte_line_is_just_a_record(tmp_path: Path) -> None:
    big = "word " * 2_000_000
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "small"}) + "\n" + json.dumps({"text": big}) + "\n")
    done = run_cli("convert", "a.jsonl.gz", "--out", "out.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [{"text": "small"}, {"text": big}]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_output_device_is_one_line(tmp_path: Path, plora_bin: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(OK * 10_000)
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [plora_bin, "convert", "a.jsonl"],
            cwd=tmp_path,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert_one_line_error(done, "stdout: cannot write: ", "No space left")
