"""Small handwritten records of every input format, and writers for every container format."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


# format name -> (raw records, the canonical records `plora convert --mode sft` must write).
# Records of one format share their keys, so that each list also fits one table (Parquet, CSV).
SAMPLES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "alpaca": (
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": ""},
            {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be kind."},
        ],
        [
            {"messages": [user("Add the numbers.\n\n2 and 3"), assistant("5")]},
            {"messages": [system("Be kind."), user("Say hi."), assistant("Hi!")]},
        ],
    ),
    "sharegpt": (
        [
            {
                "conversations": [
                    {"from": "system", "value": "You are terse."},
                    {"from": "human", "value": "Capital of France?"},
                    {"from": "gpt", "value": "Paris."},
                    {"from": "human", "value": "And Italy?"},
                    {"from": "gpt", "value": "Rome."},
                ]
            },
            {
                "conversations": [
                    {"from": "system", "value": ""},
                    {"from": "user", "value": "2+2?"},
                    {"from": "bot", "value": "4"},
                ]
            },
        ],
        [
            {
                "messages": [
                    system("You are terse."),
                    user("Capital of France?"),
                    assistant("Paris."),
                    user("And Italy?"),
                    assistant("Rome."),
                ]
            },
            {"messages": [user("2+2?"), assistant("4")]},
        ],
    ),
    "conversations-role-content": (
        [{"conversations": [{"role": "Human", "content": "Hello?"}, {"role": "model", "content": "Hello."}]}],
        [{"messages": [user("Hello?"), assistant("Hello.")]}],
    ),
    "messages": (
        [{"messages": [system("Answer briefly."), user("Name a colour."), assistant("Blue.")]}],
        [{"messages": [system("Answer briefly."), user("Name a colour."), assistant("Blue.")]}],
    ),
    "prompt-response": (
        [
            {"prompt": "Knock knock.", "response": "Who is there?"},
            {"prompt": "Once upon", "response": "a time"},
        ],
        [
            {"messages": [user("Knock knock."), assistant("Who is there?")]},
            {"messages": [user("Once upon"), assistant("a time")]},
        ],
    ),
    "text": (
        [{"text": "The quick brown fox."}, {"text": "Line one.\nLine two."}],
        [{"text": "The quick brown fox."}, {"text": "Line one.\nLine two."}],
    ),
    "canonical": (
        [
            {"main": "Shared trunk.", "branches": ["First branch.", "Second branch."]},
            {"main": "", "branches": ["Only text."]},
        ],
        [
            {"main": "Shared trunk.", "branches": ["First branch.", "Second branch."]},
            {"main": "", "branches": ["Only text."]},
        ],
    ),
}
# The format name `detect` gives each sample.
DETECTED = {name: name for name in SAMPLES} | {"conversations-role-content": "sharegpt"}


def write_jsonl(path: Path, records: Sequence[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_jsonl_gz(path: Path, records: Sequence[Any]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def write_json_array(path: Path, records: Sequence[Any]) -> Path:
    path.write_text(json.dumps(list(records), indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def write_json_wrapped(path: Path, records: Sequence[Any]) -> Path:
    path.write_text(json.dumps({"data": list(records)}, indent=1), encoding="utf-8")
    return path


def write_parquet(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    """One table for all records: a column per key, null where a record lacks the key."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), path)
    return path


def write_csv(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    """A header of all keys; list values as JSON text (how chats travel in CSV)."""
    header = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in records:
            cells = [r.get(k, "") for k in header]
            writer.writerow([json.dumps(c) if isinstance(c, list) else c for c in cells])
    return path


# container name -> (file suffix, writer)
CONTAINERS: dict[str, tuple[str, Callable[[Path, Sequence[Any]], Path]]] = {
    "jsonl": (".jsonl", write_jsonl),
    "jsonl.gz": (".jsonl.gz", write_jsonl_gz),
    "json-array": (".json", write_json_array),
    "json-wrapped": (".json", write_json_wrapped),
    "parquet": (".parquet", write_parquet),
    "csv": (".csv", write_csv),
}


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
