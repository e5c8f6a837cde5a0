"""Container readers: turn one input (a file or a HuggingFace dataset) into raw records.

Every reader yields :class:`RawRecord` items in input order and holds at most one line, one
block of text or one Arrow batch in memory, except :func:`read_json`, which loads its file
whole (a JSON document cannot be parsed in pieces with the standard library).

A unit that cannot even be decoded (invalid UTF-8, invalid JSON, a CSV row with the wrong
number of cells) is yielded with ``error`` set, so that the caller reports it through one
channel (raise or reject) and counts it; nothing is dropped silently. Blank lines between
records are not records and are skipped.

``line`` is the 1-based line in the file where the record starts (JSON Lines, JSON, CSV,
text) or the 1-based row number (Parquet, HuggingFace datasets).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import sys
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from parallel.errors import PloraError, missing_extra
from pipeline.formats import detect

UTF8_BOM = b"\xef\xbb\xbf"
JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
PARQUET_BATCH_ROWS = 1024
# Container kind by file suffix (after an optional .gz).
SUFFIX_KINDS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "txt",
}
TXT_SPLITS: tuple[str, ...] = ("blank", "line")


@dataclass(frozen=True)
class RawRecord:
    """One decoded unit of an input. ``error`` is set (and ``value`` is None) when it could not
    be decoded; ``raw`` then holds what was read, for the rejects file."""

    source: str
    line: int | None
    value: Any
    error: str | None = None
    raw: Any = None
    index: int | None = None  # 0-based position in a JSON array (one line may hold all of them)
    nulls: tuple[str, ...] = ()  # table columns that were null in this row, left out of ``value``


def input_kind(path: Path) -> str:
    """The container kind of a file, from its suffix; PloraError for an unknown one."""
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    kind = SUFFIX_KINDS.get(suffixes[-2 if gzipped else -1]) if len(suffixes) > gzipped else None
    if kind is None or (gzipped and kind == "parquet"):
        known = ", ".join(SUFFIX_KINDS)
        raise PloraError(
            f"{path}: unsupported input type; expected a name ending in {known} (or .gz of those but Parquet)"
        )
    return kind


def check_readable(path: Path) -> None:
    """Fail early, in one line, on inputs that are missing, directories or unreadable."""
    if not path.exists():
        raise PloraError(f"{path}: no such file")
    if path.is_dir():
        raise PloraError(f"{path}: is a directory; expected a data file (--hf-dataset DIR reads a folder)")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise PloraError(f"{path}: cannot read: {err.strerror or err}") from err
    input_kind(path)


def read_file(path: Path, txt_split: str = "blank") -> Iterator[RawRecord]:
    """Dispatch on the file suffix."""
    kind = input_kind(path)
    if kind == "jsonl":
        return read_jsonl(path)
    if kind == "json":
        return read_json(path)
    if kind == "parquet":
        return read_parquet(path)
    if kind == "csv":
        return read_csv(path)
    return read_txt(path, txt_split)


def _open_binary(path: Path) -> gzip.GzipFile | io.BufferedReader:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes without the line ending) per line; BOM on line 1 and CRLF accepted."""
    source = str(path)
    try:
        with _open_binary(path) as f:
            for number, line in enumerate(f, start=1):
                if number == 1 and line.startswith(UTF8_BOM):
                    line = line[len(UTF8_BOM) :]
                yield number, line.rstrip(b"\r\n")
    except (OSError, EOFError) as err:  # a truncated or corrupt .gz, a read error
        raise PloraError(f"{source}: cannot read: {_one_line(err)}") from err


def _decode_utf8(data: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, why it is not UTF-8)."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, f"invalid UTF-8: byte {err.start + 1} of the record; expected UTF-8 text"


def read_jsonl(path: Path) -> Iterator[RawRecord]:
    """JSON Lines: one JSON value a line, decoded line by line (a 10 MB line is just a long line)."""
    source = str(path)
    for number, data in _lines(path):
        if not data.strip():
            continue
        text, error = _decode_utf8(data)
        if text is None:
            yield RawRecord(source, number, None, error, data)
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            reason = f"invalid JSON: {err.msg} at column {err.colno}; expected one JSON object per line"
            yield RawRecord(source, number, None, reason, text)
            continue
        yield RawRecord(source, number, value)


def read_json(path: Path) -> Iterator[RawRecord]:
    """A JSON document, loaded whole: a top-level array of records, an object holding a single
    list of records (``{"data": [...]}``), or one record. Each element's line is where it starts
    in the file. A ``.json`` file that holds several values (JSON Lines saved as .json) is read
    as JSON Lines."""
    source = str(path)
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise PloraError(f"{source}: cannot read: {_one_line(err)}") from err
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        yield RawRecord(source, line, None, "invalid UTF-8; expected a UTF-8 JSON document", None)
        return
    del data
    if not text.strip():
        return
    json_lines = False
    try:
        yield from _json_document(source, text)
    except json.JSONDecodeError as err:
        json_lines = err.msg == "Extra data" and not text.startswith("[", _skip_whitespace(text, 0))
        if not json_lines:
            reason = f"invalid JSON: {err.msg} at column {err.colno}; the rest of the file cannot be read"
            yield RawRecord(source, err.lineno, None, reason, None)
    if json_lines:  # outside the except block, so that the whole text can be freed first
        del text
        yield from read_jsonl(path)


def _skip_whitespace(text: str, pos: int) -> int:
    """The offset of the first character at or after ``pos`` that is not JSON whitespace."""
    match = JSON_WHITESPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _json_document(source: str, text: str) -> Iterator[RawRecord]:
    """Yield the records of a whole JSON document; JSONDecodeError when it is not valid JSON."""
    start = _skip_whitespace(text, 0)
    if text.startswith("[", start):
        end = yield from _json_array(source, text, start)
        if _skip_whitespace(text, end) != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
        return
    value = json.loads(text)
    if (
        isinstance(value, dict)
        and len(value) == 1
        and isinstance(next(iter(value.values())), list)
        and detect(value) is None  # {"messages": [...]} is one record, not a wrapper of several
    ):
        # {"data": [...]}: walk to the list so that each element keeps its own line
        del value
        pos = _skip_whitespace(text, start + 1)
        _, pos = json.JSONDecoder().raw_decode(text, pos)  # the key
        pos = _skip_whitespace(text, pos)  # at ':'
        pos = _skip_whitespace(text, pos + 1)  # at '['
        yield from _json_array(source, text, pos)
        return
    yield RawRecord(source, text.count("\n", 0, start) + 1, value)


def _json_array(source: str, text: str, pos: int) -> Generator[RawRecord, None, int]:
    """Yield the elements of the array at ``text[pos] == '['`` with their start lines; return
    the offset just after the closing bracket."""
    decoder = json.JSONDecoder()
    line = text.count("\n", 0, pos) + 1
    counted = pos
    pos = _skip_whitespace(text, pos + 1)
    if text.startswith("]", pos):
        return pos + 1
    index = 0
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        value, pos = decoder.raw_decode(text, pos)
        yield RawRecord(source, line, value, index=index)
        index += 1
        pos = _skip_whitespace(text, pos)
        if text.startswith("]", pos):
            return pos + 1
        if not text.startswith(",", pos):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _skip_whitespace(text, pos + 1)


def read_parquet(path: Path) -> Iterator[RawRecord]:
    """Parquet, one Arrow batch at a time; ``line`` is the row number."""
    source = str(path)
    try:
        with pq.ParquetFile(path) as table:
            row = 0
            for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for value in batch.to_pylist():
                    row += 1
                    yield _table_row(source, row, value)
    except (pa.ArrowException, OSError) as err:
        raise PloraError(f"{source}: not a readable Parquet file: {_one_line(err)}") from err


def read_csv(path: Path) -> Iterator[RawRecord]:
    """CSV with a header row; each row becomes an object of strings keyed by the header.

    Read with the standard csv module, row by row: it gives the exact line where each record
    starts (quoted values may span lines) and lets one bad row be rejected on its own. Cells
    of the list-valued columns (``messages``, ``conversations``, ``branches``) hold JSON text
    and are decoded, so chats and parallel records can travel in CSV too.
    """
    source = str(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a 10 MB cell is a valid cell
    try:
        binary = _open_binary(path)
        with io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            if _has_undecodable(header):
                yield RawRecord(source, 1, None, "invalid UTF-8 in the CSV header; expected UTF-8 text", None)
                return
            start = reader.line_num + 1
            for row in reader:
                line, start = start, reader.line_num + 1
                if not row:
                    continue
                yield _csv_record(source, line, header, row)
    except csv.Error as err:
        raise PloraError(f"{source}: invalid CSV: {_one_line(err)}") from err
    except (OSError, EOFError) as err:
        raise PloraError(f"{source}: cannot read: {_one_line(err)}") from err


CSV_JSON_COLUMNS = frozenset({"messages", "conversations", "conversation", "branches"})


def _csv_record(source: str, line: int, header: list[str], row: list[str]) -> RawRecord:
    if _has_undecodable(row):
        raw = [cell.encode(errors="surrogateescape").decode(errors="replace") for cell in row]
        return RawRecord(source, line, None, "invalid UTF-8; expected UTF-8 text", raw)
    if len(row) != len(header):
        reason = f"wrong number of CSV cells: got {len(row)}; expected {len(header)} like the header"
        return RawRecord(source, line, None, reason, row)
    value: dict[str, Any] = dict(zip(header, row, strict=True))
    for name in CSV_JSON_COLUMNS.intersection(value):
        try:
            value[name] = json.loads(value[name])
        except json.JSONDecodeError as err:
            reason = f"invalid JSON in CSV column {name!r}: {err.msg}; expected a JSON list"
            return RawRecord(source, line, None, reason, row)
    return RawRecord(source, line, value)


def _has_undecodable(cells: list[str]) -> bool:
    """Whether surrogateescape decoding met bytes that are not UTF-8."""
    try:
        "".join(cells).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_txt(path: Path, split: str = "blank") -> Iterator[RawRecord]:
    """Plain text as ``{"text": ...}`` records: one per block of lines separated by blank
    lines (``blank``), or one per non-blank line (``line``). Line endings inside a block
    become ``\\n``; a block with bytes that are not UTF-8 is rejected as a whole."""
    if split not in TXT_SPLITS:
        raise PloraError(f"--txt-split must be one of {', '.join(TXT_SPLITS)}, got {split!r}")
    source = str(path)
    block: list[bytes] = []
    first = 0
    for number, data in _lines(path):
        if not data.strip():
            if block:
                yield _text_record(source, first, block)
                block = []
            continue
        if not block:
            first = number
        block.append(data)
        if split == "line":
            yield _text_record(source, first, block)
            block = []
    if block:
        yield _text_record(source, first, block)


def _text_record(source: str, line: int, block: list[bytes]) -> RawRecord:
    data = b"\n".join(block)
    text, error = _decode_utf8(data)
    if text is None:
        return RawRecord(source, line, None, error, data)
    return RawRecord(source, line, {"text": text})


def hf_source(name: str, split: str) -> str:
    """How records of a HuggingFace dataset name their source: ``NAME[SPLIT]``."""
    return f"{name}[{split}]"


def read_hf_dataset(
    name: str,
    subset: str | None = None,
    split: str = "train",
    streaming: bool = False,
) -> Iterator[RawRecord]:
    """A HuggingFace dataset: a folder written by ``Dataset.save_to_disk``, a local folder of
    data files (.jsonl/.json/.parquet/.csv, loaded by the matching ``datasets`` builder), or
    a hub name (needs the network). ``line`` is the row number; the source reads
    ``NAME[SPLIT]``. Never runs remote code."""
    try:
        import datasets  # noqa: PLC0415 - the optional 'hf' extra, absent on the training machine
    except ImportError:
        raise missing_extra("--hf-dataset", "hf") from None

    source = hf_source(name, split)
    try:
        if (Path(name) / "state.json").is_file() or (Path(name) / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split]
            rows = loaded.to_iterable_dataset() if streaming else loaded
        else:
            rows = datasets.load_dataset(name, subset, split=split, streaming=streaming)
        for row, value in enumerate(rows, start=1):
            yield _table_row(source, row, value)
    except Exception as err:  # datasets raises many kinds; all mean "cannot load"
        raise PloraError(f"{source}: cannot load the HuggingFace dataset: {_one_line(err)}") from err


def _table_row(source: str, line: int, row: Any) -> RawRecord:
    """A table row without its null columns: in a table, a record of one format has nulls in
    the columns that only records of another format use, and a null there means absent. Which
    ones were null is kept, to say so when what is left is no record."""
    if not isinstance(row, dict):
        return RawRecord(source, line, row)
    nulls = tuple(k for k, v in row.items() if v is None)
    return RawRecord(source, line, {k: v for k, v in row.items() if v is not None}, nulls=nulls)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__
