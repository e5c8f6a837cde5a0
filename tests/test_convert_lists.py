"""`plora convert --split-lists` (issue 7 item 4; bad input from item 7): a list answer becomes a chat
parallel record whose lead-in and branches join back to the answer exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_cli

from pipeline.lists import NO_LIST, TEXT_AFTER, ListSplit, fewer_than, split_answer


def convert(*args: object) -> tuple[list[dict], str]:
    done = run_cli("convert", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()], done.stderr


def summary_line(stderr: str) -> str:
    return next(line.strip() for line in stderr.splitlines() if line.strip().startswith("--split-lists:"))


def check_alpaca_split(path: Path) -> int:
    """Every Alpaca record either splits into a lead-in and branches that join to its output, or
    comes out as plain convert writes it; the summary counts both. Returns the records split."""
    originals = json.loads(path.read_text(encoding="utf-8"))
    split, stderr = convert(path, "--split-lists")
    plain, _ = convert(path)
    assert len(split) == len(plain) == len(originals)
    parallel = 0
    for original, record, chat in zip(originals, split, plain, strict=True):
        if "branches" not in record:
            assert record == chat
            continue
        parallel += 1
        assert record["messages"] == chat["messages"][:-1]
        assert record.get("lead", "") + "".join(record["branches"]) == original["output"]
        assert len(record["branches"]) >= 3
        if record["branches"][0].startswith("1"):  # numbered: branch k reads "k. ..."
            assert all(b.startswith(f"{k}") for k, b in enumerate(record["branches"], start=1))
    kept = len(originals) - parallel
    assert summary_line(stderr).startswith(
        f"--split-lists: {len(originals):,} records in, {parallel:,} parallel records out ("
    )
    assert f"{kept:,} kept as they were" in summary_line(stderr)
    return parallel


def test_split_lists_sample_alpaca_joins_back_exactly(sample_dir: Path) -> None:
    assert check_alpaca_split(sample_dir / "sample_alpaca.json") >= 3


def test_split_lists_shared_alpaca_joins_back_exactly(shared_file) -> None:
    assert check_alpaca_split(shared_file("alpaca_2k.json")) >= 150


LIST = "Three ways:\n\n1. Walk.\n2. Cycle,\n   when dry.\n3. Take the bus.\n"


def test_split_lists_every_input_format(tmp_path: Path) -> None:
    """The last assistant turn of the normalised chat is split, whatever the format; the turns before it
    are the trunk's messages."""
    records = [
        {
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
                {"from": "human", "value": "How to get to work?"},
                {"from": "gpt", "value": LIST},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": LIST},
            ]
        },
        {"prompt": "How to get to work?", "response": LIST},
        {"instruction": "Shop", "output": "- bread\n- milk\n- eggs"},
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out, stderr = convert(path, "--split-lists")
    branches = ["1. Walk.\n", "2. Cycle,\n   when dry.\n", "3. Take the bus.\n"]
    assert out[0] == {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How to get to work?"},
        ],
        "lead": "Three ways:\n\n",
        "branches": branches,
    }
    assert out[1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q"},
    ]
    assert out[1]["branches"] == out[2]["branches"] == branches
    assert out[3] == {
        "messages": [{"role": "user", "content": "Shop"}],
        "branches": ["- bread\n", "- milk\n", "- eggs"],
    }
    assert "4 parallel records out (12 branches), 0 kept as they were" in summary_line(stderr)


def test_split_lists_text_after_the_list_keeps_the_record_whole_and_counted(tmp_path: Path) -> None:
    records = [
        {"instruction": "Tips", "output": "1. a\n2. b\n3. c\n\nThat is all."},
        {"instruction": "Two", "output": "1. a\n2. b"},
        {"instruction": "Prose", "output": "No list here."},
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    out, stderr = convert(path, "--split-lists")
    assert [r["messages"][-1]["content"] for r in out] == [r["output"] for r in records]
    assert summary_line(stderr) == (
        "--split-lists: 3 records in, 0 parallel records out (0 branches), 3 kept as they were "
        "(1 text after the list, 1 fewer than 3 items, 1 no list)"
    )
    out, _ = convert(path, "--split-lists", "--min-items", "2")
    assert out[1]["branches"] == ["1. a\n", "2. b"]


def test_split_lists_on_records_without_assistant_turns_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}\n'
        '{"text": "a plain document"}\n',
        encoding="utf-8",
    )
    line = one_line_error(run_cli("convert", path, "--split-lists"))
    assert line.startswith(f"plora: error: {path}:2: no assistant turn")
    done = run_cli(
        "convert",
        path,
        "--split-lists",
        "--on-error",
        "skip",
        "--rejects",
        tmp_path / "rejects.jsonl",
    )
    assert done.returncode == 0, done.stderr
    assert "2 records in, 1 out, 1 rejected" in done.stderr


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("1. a\n2. b\n3. c", ListSplit("", ["1. a\n", "2. b\n", "3. c"])),
        ("Lead:\n1) a\n\n2) b\n\n3) c\n\n", ListSplit("Lead:\n", ["1) a\n\n", "2) b\n\n", "3) c\n\n"])),
        ("• a\n  - nested\n• b\n• c", ListSplit("", ["• a\n  - nested\n", "• b\n", "• c"])),
        ("1. a\n2. b\n4. c", fewer_than(3)),  # numbers that do not count up end the list
        ("- a\n- b\n* c", fewer_than(3)),
        ("1. a\n2. b\n3. c\nDone.", TEXT_AFTER),
        ("3. a\n4. b\n5. c", NO_LIST),
        ("**Bold** text\n1.5 kg", NO_LIST),
    ],
)
def test_split_answer_finds_the_list(answer: str, expected: ListSplit | str) -> None:
    assert split_answer(answer, 3) == expected
