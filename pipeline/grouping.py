"""`plora convert --group-by FIELD[,FIELD]`: records that share fields become one parallel record.

Several questions about one passage (SQuAD, HotpotQA) or several answers to one instruction are
one trunk with many branches. The input is read by polars with a lazy scan that keeps only the
columns used, and grouped by its streaming engine, so no Python object per record is ever built
before the groups are.

Each record is read as prompt and response fields (the first response field found that is not a
group field decides the format):

=============  =========================  =================
response       prompt fields              format
=============  =========================  =================
``output``     ``instruction``, ``input``  Alpaca
``response``   ``prompt``                  prompt/response
``completion`` ``prompt``                  prompt/completion
``answer``     ``question``                question/answer
=============  =========================  =================

A group becomes the chat parallel record (:mod:`pipeline.chat_parallel`)::

    {"messages": [{"role": "system", ...}?, {"role": "user", "content": GROUP FIELDS}], "branches": [...]}

- the user turn is the group fields' values joined by a blank line, in ``--group-by`` order (Alpaca
  grouped by ``instruction,input`` gives the user turn that plain convert writes);
- a ``system`` field, when the records have one, is the system turn and part of the group key;
- each record's prompt fields that are not group fields, joined by a blank line, are its
  branch's prompt and its response field is the response: ``{"prompt", "response"}``; when no
  record of the group has a prompt, the branches are plain strings (several answers to one
  question);
- groups larger than ``--max-branches`` are split into that many branches or fewer, of
  near-equal sizes, each with the same trunk, in input order;
- a record alone in its group is kept as it was: the ordinary chat plain convert writes.

Groups come out in the order of their first record; branches in input order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from parallel.layout import RecordError, parse_record, record_to_json
from pipeline.chat_parallel import ParallelCounts, chat_parallel_record
from pipeline.errors import PloraError, Rejects, first_line
from pipeline.readers import input_kind

DEFAULT_MAX_BRANCHES = 8
RESPONSE_PROMPTS: dict[str, tuple[str, ...]] = {
    "output": ("instruction", "input"),
    "response": ("prompt",),
    "completion": ("prompt",),
    "answer": ("question",),
}
SCANNED = ("jsonl", "json", "parquet", "csv")
ROW = "__plora_row"  # the record number (1-based) carried through the query
FIRST = "__plora_first"


def parse_fields(text: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``; PloraError on an empty name."""
    fields = tuple(name.strip() for name in text.split(","))
    if not all(fields):
        raise PloraError(f"--group-by {text!r}: expected field names separated by commas")
    return fields


def scan(path: Path) -> Any:
    """A polars LazyFrame over ``path``, every column as read (CSV cells as strings)."""
    import polars as pl  # noqa: PLC0415 - only --group-by needs it

    kind = input_kind(path)
    if kind not in SCANNED or path.suffix.lower() == ".gz":
        raise PloraError(
            f"{path}: --group-by reads .jsonl, .ndjson, .json, .parquet or .csv files (not gzipped)"
        )
    try:
        if kind == "jsonl":
            return pl.scan_ndjson(path, infer_schema_length=None)  # a field first seen late still counts
        if kind == "parquet":
            return pl.scan_parquet(path)
        if kind == "csv":
            return pl.scan_csv(path, infer_schema=False)
        return pl.read_json(path).lazy()  # a JSON document is parsed whole, as plain convert does
    except (pl.exceptions.PolarsError, OSError) as err:
        raise PloraError(f"{path}: cannot read for --group-by: {first_line(err)}") from err


def group_query(frame: Any, path: Path, fields: Sequence[str]) -> tuple[Any, Any, list[str], str]:
    """(bad rows, groups, prompt fields, response field): two lazy queries over ``frame``.

    The groups hold the key columns, ``FIRST`` (the group's first record) and the list columns
    ``ROW``, the prompt fields and the response field, one list item per record, in input order.
    """
    import polars as pl  # noqa: PLC0415

    try:
        columns = list(frame.collect_schema().names())
    except pl.exceptions.PolarsError as err:
        raise PloraError(f"{path}: cannot read for --group-by: {first_line(err)}") from err
    keys = [name for name in fields if name != "system"]
    missing = [name for name in fields if name not in columns]
    if missing:
        raise PloraError(
            f"{path}: --group-by field {missing[0]!r} is missing; "
            f"the records have fields {', '.join(columns)}"
        )
    if not keys:
        raise PloraError("--group-by needs a field besides 'system' to make the user turn of the trunk")
    response = next((name for name in RESPONSE_PROMPTS if name in columns and name not in fields), None)
    if response is None:
        raise PloraError(
            f"{path}: --group-by needs a response field outside the group ({', '.join(RESPONSE_PROMPTS)}); "
            f"the records have fields {', '.join(columns)}"
        )
    prompts = [name for name in RESPONSE_PROMPTS[response] if name in columns and name not in fields]
    system = ["system"] if "system" in columns else []
    text = [pl.col(name).cast(pl.String) for name in [*keys, *system, *prompts, response]]
    rows = frame.with_row_index(ROW, offset=1).select(ROW, *text)
    blank = [pl.col(name).is_null() | (pl.col(name).str.strip_chars() == "") for name in [*keys, response]]
    bad = pl.any_horizontal(blank)
    fill = [pl.col(name).fill_null("") for name in system]  # no system prompt is a key of its own
    groups = (
        rows.filter(~bad)
        .with_columns(*fill)
        .group_by([*keys, *system])
        .agg(pl.col(ROW).min().alias(FIRST), pl.col(ROW), *(pl.col(name) for name in [*prompts, response]))
        .sort(FIRST)
    )
    return rows.filter(bad), groups, prompts, response


def group_file(
    path: Path, fields: Sequence[str], max_branches: int, rejects: Rejects, counts: ParallelCounts
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(first record number, record JSON) of every group of ``path``; bad records are rejected."""
    import polars as pl  # noqa: PLC0415

    bad, groups, prompts, response = group_query(scan(path), path, fields)
    keys = [name for name in fields if name != "system"]
    try:
        bad_rows = bad.collect(engine="streaming")
        grouped = groups.collect(engine="streaming")
    except pl.exceptions.PolarsError as err:
        raise PloraError(f"{path}: cannot read for --group-by: {first_line(err)}") from err
    for row in bad_rows.iter_rows(named=True):
        counts.records_in += 1
        empty = next(name for name in [*keys, response] if not (row[name] or "").strip())
        reason = f"record {row[ROW]}: field {empty!r} is missing or empty; expected text"
        rejects.reject(str(path), None, reason, {k: v for k, v in row.items() if k != ROW})
    for group in grouped.iter_rows(named=True):
        members = len(group[ROW])
        counts.records_in += members
        if members == 1:
            counts.kept["alone in its group"] += 1
            yield group[ROW][0], _chat(group, keys, prompts, response)
            continue
        for start, stop in _chunks(members, max_branches):
            counts.parallel_out += 1
            counts.branches += stop - start
            yield group[ROW][start], _parallel(group, keys, prompts, response, start, stop)


def _chunks(n: int, most: int) -> list[tuple[int, int]]:
    """``n`` items as ceil(n / most) consecutive runs of near-equal sizes."""
    parts = -(-n // most)
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _trunk(group: dict[str, Any], keys: list[str]) -> list[dict[str, str]]:
    system = group.get("system") or ""
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return [*messages, {"role": "user", "content": "\n\n".join(group[name] for name in keys)}]


def _asked(group: dict[str, Any], prompts: list[str], i: int) -> str:
    """Record ``i``'s prompt fields joined by a blank line (empty ones left out)."""
    return "\n\n".join(part for name in prompts if (part := group[name][i]) and part.strip())


def _chat(group: dict[str, Any], keys: list[str], prompts: list[str], response: str) -> dict[str, Any]:
    """A record alone in its group, as the chat that plain convert writes of it."""
    *system, user = _trunk(group, keys)
    content = "\n\n".join(filter(None, [user["content"], _asked(group, prompts, 0)]))
    answer = {"role": "assistant", "content": group[response][0]}
    chat = [*system, {"role": "user", "content": content}, answer]
    return record_to_json(parse_record({"messages": chat}))


def _parallel(
    group: dict[str, Any], keys: list[str], prompts: list[str], response: str, start: int, stop: int
) -> dict[str, Any]:
    asked = [_asked(group, prompts, i) for i in range(start, stop)]
    answers = group[response][start:stop]
    if any(_asked(group, prompts, i) for i in range(len(group[ROW]))):
        branches: list[Any] = [{"prompt": p, "response": r} for p, r in zip(asked, answers, strict=True)]
    else:
        branches = list(answers)
    try:
        return chat_parallel_record(_trunk(group, keys), branches)
    except RecordError as err:
        raise PloraError(f"invalid group: {err}") from None
