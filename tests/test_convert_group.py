"""`plora convert --group-by` (issue 7 item 4; bad input from item 7): records that share fields become one
chat parallel record, grouped by polars from a lazy scan."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import polars as pl
import pytest
from cli_helpers import one_line_error, run_cli

from parallel.errors import Rejects
from pipeline import grouping
from pipeline.chat_parallel import ParallelCounts
from pipeline.grouping import group_query, scan

QA = [
    {"context": "Passage A", "question": "Q1?", "answer": "A1", "id": 1},
    {"context": "Passage B", "question": "Q2?", "answer": "A2", "id": 2},
    {"context": "Passage A", "question": "Q3?", "answer": "A3", "id": 3},
    {"context": "Passage A", "question": "Q4?", "answer": "A4", "id": 4},
    {"context": "Passage C", "question": "Q5?", "answer": "A5", "id": 5},
    {"context": "Passage A", "question": "Q6?", "answer": "A6", "id": 6},
    {"context": "Passage C", "question": "Q7?", "answer": "A7", "id": 7},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def convert(*args: object) -> tuple[list[dict], str]:
    done = run_cli("convert", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()], done.stderr


def trunk(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def qa(*numbers: int) -> list[dict]:
    return [{"prompt": f"Q{n}?", "response": f"A{n}"} for n in numbers]


def test_group_by_passage_splits_wide_groups_and_counts(tmp_path: Path) -> None:
    out, stderr = convert(
        write_jsonl(tmp_path / "qa.jsonl", QA), "--group-by", "context", "--max-branches", "3"
    )
    assert out == [
        {"messages": trunk("Passage A"), "branches": qa(1, 3)},  # 4 > 3 branches: two records of 2
        {"messages": trunk("Passage A"), "branches": qa(4, 6)},
        {"messages": [*trunk("Passage B\n\nQ2?"), {"role": "assistant", "content": "A2"}]},  # alone
        {"messages": trunk("Passage C"), "branches": qa(5, 7)},
    ]
    assert "7 records in, 4 out, 0 rejected" in stderr
    assert (
        "--group-by context: 7 records in, 3 parallel records out (6 branches), 1 kept as they were "
        "(1 alone in its group)" in stderr
    )


def test_group_by_reads_csv_parquet_and_json_alike(tmp_path: Path) -> None:
    expected, _ = convert(write_jsonl(tmp_path / "qa.jsonl", QA), "--group-by", "context")
    with open(tmp_path / "qa.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(QA[0]))
        writer.writeheader()
        writer.writerows(QA)
    pl.DataFrame(QA).write_parquet(tmp_path / "qa.parquet")
    (tmp_path / "qa.json").write_text(json.dumps(QA), encoding="utf-8")
    for name in ("qa.csv", "qa.parquet", "qa.json"):
        assert convert(tmp_path / name, "--group-by", "context")[0] == expected, name


def test_group_by_alpaca_instruction(tmp_path: Path) -> None:
    """One instruction with several answers: string branches; with inputs: {prompt, response} branches;
    a system field is the system turn and part of the key."""
    records = [
        {"instruction": "Name a colour.", "input": "", "output": "Red."},
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Translate.", "input": "chien", "output": "dog"},
        {"instruction": "Name a colour.", "input": "", "output": "Green.", "system": "Be terse."},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    out, _ = convert(path, "--group-by", "instruction")
    plain, _ = convert(write_jsonl(tmp_path / "last.jsonl", records[-1:]))
    assert out == [
        {"messages": trunk("Name a colour."), "branches": ["Red.", "Blue."]},
        {
            "messages": trunk("Translate."),
            "branches": [{"prompt": "chat", "response": "cat"}, {"prompt": "chien", "response": "dog"}],
        },
        *plain,
    ]


def test_group_by_missing_field_is_one_line_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    line = one_line_error(run_cli("convert", path, "--group-by", "context,passage"))
    assert line == (
        f"plora: error: {path}: --group-by field 'passage' is missing; "
        "the records have fields context, question, answer, id"
    )


def test_group_by_record_without_the_field(tmp_path: Path) -> None:
    """A record that lacks a group field's value: a one-line error naming file and record, or with
    --on-error skip a counted reject."""
    path = write_jsonl(tmp_path / "qa.jsonl", [*QA[:3], {"question": "Q?", "answer": "A"}, *QA[3:]])
    line = one_line_error(run_cli("convert", path, "--group-by", "context"))
    assert line.startswith(f"plora: error: {path}: record 4: field 'context' is missing")
    out, stderr = convert(
        path,
        "--group-by",
        "context",
        "--on-error",
        "skip",
        "--rejects",
        tmp_path / "rejects.jsonl",
    )
    assert len(out) == 3
    assert "8 records in, 3 out, 1 rejected" in stderr
    assert json.loads((tmp_path / "rejects.jsonl").read_text())["raw"]["question"] == "Q?"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", ":2: invalid JSON: Expecting property name enclosed in double quotes at column 2"),
        (
            '{"context": {"x": 1}, "question": "Q?", "answer": "A"}',
            ": --group-by: field 'context' holds Struct",
        ),
    ],
)
def test_group_by_unreadable_record_is_one_line_error(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "qa.jsonl"
    first = json.dumps(QA[0]) if line.startswith("{not") else line  # a field of one type in every record
    path.write_text(first + "\n" + line + "\n", encoding="utf-8")
    assert one_line_error(run_cli("convert", path, "--group-by", "context")).startswith(
        f"plora: error: {path}{expected}"
    )


@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "csv"])
def test_group_by_is_a_lazy_streaming_scan(tmp_path: Path, suffix: str) -> None:
    """The files are scanned lazily (only the columns used are read) and the query runs on polars'
    streaming engine, so memory does not hold the file's unused columns or one Python object per record."""
    frame = pl.DataFrame(QA)
    path = tmp_path / f"qa.{suffix}"
    getattr(frame, "write_ndjson" if suffix == "jsonl" else f"write_{suffix}")(path)
    lazy = scan(path)
    assert isinstance(lazy, pl.LazyFrame)
    rows, _, _ = group_query(lazy, path, ["context"])
    plan = rows.explain(engine="streaming")
    assert "SCAN" in plan and "PROJECT 3/4 COLUMNS" in plan, plan  # 'id' is never read


def test_group_by_in_hash_buckets_gives_the_same_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file larger than a bucket is grouped bucket by bucket, one in memory at a time, and the merge
    gives the same records in the same order as one bucket."""
    path = write_jsonl(tmp_path / "qa.jsonl", QA * 30)

    def grouped() -> tuple[list, ParallelCounts]:
        counts = ParallelCounts("--group-by")
        return list(grouping.group_file(path, ["context"], 8, Rejects(), counts)), counts

    whole, counts = grouped()
    monkeypatch.setattr(grouping, "BUCKET_BYTES", 100)
    assert grouped() == (whole, counts)
    contexts = [record["messages"][0]["content"] for _, record in whole]
    assert contexts == ["Passage A"] * 15 + ["Passage B"] * 4 + ["Passage C"] * 8  # 120, 30, 60 records
    assert counts.records_in == len(QA) * 30 and counts.parallel_out == 27
