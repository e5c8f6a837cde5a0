"""`plora convert --group-by FIELD[,FIELD]`: records that share fields become one parallel record.

Several questions about one passage (SQuAD, HotpotQA) or several answers to one instruction are
one trunk with many branches. The input is read by polars with a lazy scan that keeps only the
columns used, on its streaming engine, and grouped in bounded memory: the rows are spread by a
hash of the key over Parquet buckets of about ``BUCKET_BYTES`` of input in a temporary directory
(``TMPDIR``), each bucket is grouped alone, and the buckets' groups are merged back into input
order. Measured: a 200 MB JSONL of 200,000 records peaks at 158 MB of anonymous memory, a 400 MB
one at 171 MB (the input's pages are mapped from the file, not held).

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

import heapq
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from parallel.errors import InputError, PloraError, Rejects, first_line
from parallel.layout import RecordError, parse_record, record_to_json
from pipeline.chat_parallel import ParallelCounts, chat_parallel_record
from pipeline.readers import input_kind, read_file

DEFAULT_MAX_BRANCHES = 8
RESPONSE_PROMPTS: dict[str, tuple[str, ...]] = {
    "output": ("instruction", "input"),
    "response": ("prompt",),
    "completion": ("prompt",),
    "answer": ("question",),
}
SCANNED = ("jsonl", "json", "parquet", "csv")
ROW = "__plora_row"  # the record number (1-based) carried through the query
FIRST = "__plora_first"  # a group's first record
BUCKET = "__plora_bucket"
BUCKET_BYTES = 64 * 2**20  # input bytes per hash bucket: what one grouping step holds in memory
# Parquet row groups are what a writer buffers and a reader decodes at a time, per file: small ones
# keep the bucket writers (one open file per bucket) and the merge (one reader per bucket) small.
ROWS_PER_ROW_GROUP = 4096
GROUPS_PER_ROW_GROUP = 64


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
        raise read_error(path, err) from err


@dataclass(frozen=True)
class GroupSpec:
    """Which columns play which part: the user turn's keys, the system turn, the prompt, the response."""

    keys: list[str]
    system: list[str]  # ["system"] when the records have that field
    prompts: list[str]
    response: str

    @property
    def key(self) -> list[str]:
        return [*self.keys, *self.system]


def read_error(path: Path, err: Exception) -> PloraError:
    """What polars could not read, said as plain convert says it: the first bad record's line."""
    bad = next((raw for raw in read_file(path) if raw.error is not None), None)
    if bad is not None:
        return InputError(str(path), bad.line, f"{bad.error} (--group-by needs every record readable)")
    return PloraError(f"{path}: cannot read for --group-by: {first_line(err)}")


def group_query(frame: Any, path: Path, fields: Sequence[str]) -> tuple[Any, Any, GroupSpec]:
    """(good rows, bad rows, spec): lazy queries over ``frame`` that read only the columns used,
    each as text, with ``ROW``, the record number; a bad row lacks a key's or the response's text."""
    import polars as pl  # noqa: PLC0415 - only --group-by needs it

    try:
        schema = frame.collect_schema()
    except pl.exceptions.PolarsError as err:
        raise read_error(path, err) from err
    columns = list(schema.names())
    missing = [name for name in fields if name not in columns]
    if missing:
        raise PloraError(
            f"{path}: --group-by field {missing[0]!r} is missing; "
            f"the records have fields {', '.join(columns)}"
        )
    keys = [name for name in fields if name != "system"]
    if not keys:
        raise PloraError("--group-by needs a field besides 'system' to make the user turn of the trunk")
    response = next((name for name in RESPONSE_PROMPTS if name in columns and name not in fields), None)
    if response is None:
        raise PloraError(
            f"{path}: --group-by needs a response field outside the group ({', '.join(RESPONSE_PROMPTS)}); "
            f"the records have fields {', '.join(columns)}"
        )
    prompts = [name for name in RESPONSE_PROMPTS[response] if name in columns and name not in fields]
    spec = GroupSpec(keys, ["system"] if "system" in columns else [], prompts, response)
    nested = next((name for name in [*spec.key, *prompts, response] if schema[name].is_nested()), None)
    if nested is not None:
        raise PloraError(f"{path}: --group-by: field {nested!r} holds {schema[nested]}; expected text")
    text = [pl.col(name).cast(pl.String) for name in [*spec.key, *prompts, response]]
    rows = frame.with_row_index(ROW, offset=1).select(ROW, *text)
    bad = pl.any_horizontal(
        [pl.col(name).is_null() | (pl.col(name).str.strip_chars() == "") for name in [*keys, response]]
    )
    fill = [pl.col(name).fill_null("") for name in spec.system]  # no system prompt is a key of its own
    return rows.filter(~bad).with_columns(*fill), rows.filter(bad), spec


def aggregate(rows: Any, spec: GroupSpec) -> Any:
    """The groups of ``rows``, in the order of their first record: the key columns, ``FIRST`` and the
    list columns ``ROW``, prompts and response, one item per record, in input order."""
    import polars as pl  # noqa: PLC0415 - only --group-by needs it

    return (
        rows.group_by(spec.key)
        .agg(
            pl.col(ROW).min().alias(FIRST), pl.col(ROW), *(pl.col(c) for c in [*spec.prompts, spec.response])
        )
        .sort(FIRST)
    )


def group_file(
    path: Path, fields: Sequence[str], max_branches: int, rejects: Rejects, counts: ParallelCounts
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(first record number, record JSON) of every group of ``path``; bad records are rejected."""
    import polars as pl  # noqa: PLC0415 - only --group-by needs it

    rows, bad, spec = group_query(scan(path), path, fields)
    try:
        bad_rows = bad.collect(engine="streaming")
    except pl.exceptions.PolarsError as err:
        raise read_error(path, err) from err
    for row in bad_rows.iter_rows(named=True):
        counts.records_in += 1
        empty = next(name for name in [*spec.keys, spec.response] if not (row[name] or "").strip())
        reason = f"record {row[ROW]}: field {empty!r} is missing or empty; expected text"
        rejects.reject(str(path), None, reason, {k: v for k, v in row.items() if k != ROW})
    for group in _groups(path, rows, spec):
        members = len(group[ROW])
        counts.records_in += members
        if members == 1:
            counts.kept["alone in its group"] += 1
            yield group[ROW][0], _chat(group, spec)
            continue
        for start, stop in _chunks(members, max_branches):
            counts.parallel_out += 1
            counts.branches += stop - start
            yield group[ROW][start], _parallel(group, spec, start, stop)


def _groups(path: Path, rows: Any, spec: GroupSpec) -> Iterator[dict[str, Any]]:
    """The groups of ``rows`` in bounded memory, as dicts, in the order of their first record.

    A hash of the key spreads the rows over buckets of about BUCKET_BYTES of input (a streaming
    sink to Parquet files in a temporary directory); each bucket is grouped on its own (one bucket
    in memory at a time) into a file of groups sorted by first record; the bucket files are then
    merged, a row group of each at a time.
    """
    import polars as pl  # noqa: PLC0415 - only --group-by needs it

    buckets = max(1, -(-path.stat().st_size // BUCKET_BYTES))
    hashed = rows.with_columns(pl.struct(spec.key).hash(seed=0).mod(buckets).alias(BUCKET))
    with tempfile.TemporaryDirectory(prefix="plora-group-") as tmp:
        spread = pl.PartitionBy(Path(tmp, "rows"), key=BUCKET, include_key=False)
        try:
            hashed.sink_parquet(spread, row_group_size=ROWS_PER_ROW_GROUP, mkdir=True, engine="streaming")
            files = []
            for bucket in sorted(Path(tmp, "rows").iterdir()):
                files.append(Path(tmp, f"groups-{bucket.name}.parquet"))
                groups = aggregate(pl.scan_parquet(bucket), spec)
                groups.sink_parquet(files[-1], row_group_size=GROUPS_PER_ROW_GROUP, engine="streaming")
        except pl.exceptions.PolarsError as err:
            raise read_error(path, err) from err
        yield from heapq.merge(*map(_read_groups, files), key=lambda group: group[FIRST])


def _read_groups(path: Path) -> Iterator[dict[str, Any]]:
    with pq.ParquetFile(path) as groups:
        for batch in groups.iter_batches(batch_size=GROUPS_PER_ROW_GROUP):
            yield from batch.to_pylist()


def _chunks(n: int, most: int) -> list[tuple[int, int]]:
    """``n`` items as ceil(n / most) consecutive runs of near-equal sizes."""
    parts = -(-n // most)
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _trunk(group: dict[str, Any], spec: GroupSpec) -> list[dict[str, str]]:
    system = group.get("system") or ""
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return [*messages, {"role": "user", "content": "\n\n".join(group[name] for name in spec.keys)}]


def _asked(group: dict[str, Any], spec: GroupSpec, i: int) -> str:
    """Record ``i``'s prompt fields joined by a blank line (empty ones left out)."""
    return "\n\n".join(part for name in spec.prompts if (part := group[name][i]) and part.strip())


def _chat(group: dict[str, Any], spec: GroupSpec) -> dict[str, Any]:
    """A record alone in its group, as the chat that plain convert writes of it."""
    *system, user = _trunk(group, spec)
    content = "\n\n".join(filter(None, [user["content"], _asked(group, spec, 0)]))
    answer = {"role": "assistant", "content": group[spec.response][0]}
    chat = [*system, {"role": "user", "content": content}, answer]
    return record_to_json(parse_record({"messages": chat}))


def _parallel(group: dict[str, Any], spec: GroupSpec, start: int, stop: int) -> dict[str, Any]:
    asked = [_asked(group, spec, i) for i in range(start, stop)]
    answers = group[spec.response][start:stop]
    if any(_asked(group, spec, i) for i in range(len(group[ROW]))):
        branches: list[Any] = [{"prompt": p, "response": r} for p, r in zip(asked, answers, strict=True)]
    else:
        branches = list(answers)
    try:
        return chat_parallel_record(_trunk(group, spec), branches)
    except RecordError as err:
        raise PloraError(f"invalid group: {err}") from None
