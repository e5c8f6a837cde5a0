"""Shard directories: writing Arrow IPC shard files and reading them back, memory-mapped and verified.

A shard directory holds ``shard-00000.arrow``, ``shard-00001.arrow``, ... (Arrow IPC *file* format,
one record batch each, columns :data:`SCHEMA`) and ``manifest.json``, written last. The manifest is
the directory's seal: without it the directory is incomplete and readers refuse it. Every file is
written under a temporary name, fsynced and renamed (:mod:`parallel.atomic`), so a file that has
its final name is whole.

This module imports only numpy and pyarrow (plus :mod:`parallel.fingerprint` lazily, to compare a
tokenizer), so the trainer can read shards on a machine without the conversion dependencies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from parallel import atomic
from parallel.errors import PloraError
from parallel.fingerprint import canonical_json, check_same_tokenizer, file_sha256, sha256_text
from parallel.jsonfile import Count, Shape, fields_problem, json_text, missing_keys, read_object
from parallel.layout import (
    ALIGN_MODES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    META_COLUMNS,
    SHARD_SUFFIX,
    TOKEN_COLUMNS,
    PackedRow,
)

# Where an unfinished `plora tokenize` keeps the state it resumes from (see pipeline.journal).
JOURNAL_NAME = ".progress.npz"
# The manifest's digest of its own other keys: a fact edited after writing (the packing's align,
# which reaches every adapter's plora.json) no longer matches it.
SEAL_KEY = "manifest_sha256"

SCHEMA = pa.schema(
    [pa.field(name, pa.list_(pa.int32())) for name in TOKEN_COLUMNS]
    + [pa.field(name, pa.int32()) for name in META_COLUMNS],
    metadata={"plora_format_version": str(FORMAT_VERSION)},
)

# Every key of a manifest with its JSON type, checked on reading, so that a damaged manifest is a
# one-line error naming the key, not a KeyError deep inside.
MANIFEST_SHAPE: Shape = {
    "format_version": int,
    "plora_version": str,
    "tokenizer": dict,
    "chat_template": dict,
    "special_tokens": dict,
    "packing": dict,
    "convert": dict,
    "rows_per_shard": Count,
    "fingerprint": dict,
    "files": list,
    "num_rows": Count,
    "num_tokens": Count,
    "num_trained": Count,
    "meta_columns": list,
}
NESTED_SHAPE: dict[str, Shape] = {
    "tokenizer": {
        "version": int,
        "name_or_path": str,
        "vocab_size": Count,
        "vocab_sha256": str,
        "sha256": str,
    },
    "chat_template": {"file": (str, type(None)), "template": (str, dict, type(None))},
    "special_tokens": {"eos_id": Count},
    "packing": {"align": str, "max_seq_len": Count, "max_branches": Count},
    "fingerprint": {"digest": str},
}
FILE_SHAPE: Shape = {
    "name": str,
    "bytes": Count,
    "sha256": str,
    "rows": Count,
    "tokens": Count,
    "trained": Count,
}


@dataclass(frozen=True)
class ShardFile:
    """A manifest's entry for one shard file."""

    name: str
    rows: int
    tokens: int
    trained: int  # tokens that are training targets
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(obj: dict[str, Any]) -> ShardFile:
        return ShardFile(
            name=obj["name"],
            rows=obj["rows"],
            tokens=obj["tokens"],
            trained=obj["trained"],
            bytes=obj["bytes"],
            sha256=obj["sha256"],
        )


@dataclass(frozen=True)
class Manifest:
    """manifest.json, the seal of a shard directory. ``tokenizer`` is the identity of
    parallel.fingerprint, ``packing`` the PackingOptions, ``fingerprint`` the run fingerprint
    (parts and digest). ``seal`` is its ``manifest_sha256`` as read (None before it is written)."""

    plora_version: str
    tokenizer: dict[str, Any]
    # What rendered the chats ({"file", "template"}; file None: the tokenizer's own); readers never
    # need it to read ids.
    chat_template: dict[str, Any]
    special_tokens: dict[str, Any]
    packing: dict[str, Any]
    convert: dict[str, Any]
    rows_per_shard: int
    fingerprint: dict[str, Any]
    files: tuple[ShardFile, ...]
    num_rows: int
    num_tokens: int
    num_trained: int
    meta_columns: tuple[str, ...] = META_COLUMNS
    seal: str | None = None  # None until written

    @property
    def digest(self) -> str:
        return self.fingerprint["digest"]

    def to_json(self) -> dict[str, Any]:
        """The manifest without its seal."""
        return {
            "format_version": FORMAT_VERSION,
            "plora_version": self.plora_version,
            "tokenizer": self.tokenizer,
            "chat_template": self.chat_template,
            "special_tokens": self.special_tokens,
            "packing": self.packing,
            "convert": self.convert,
            "rows_per_shard": self.rows_per_shard,
            "fingerprint": self.fingerprint,
            "files": [f.to_json() for f in self.files],
            "num_rows": self.num_rows,
            "num_tokens": self.num_tokens,
            "num_trained": self.num_trained,
            "meta_columns": list(self.meta_columns),
        }


class ShardError(PloraError):
    """A shard directory that cannot be trusted: incomplete, corrupt, or built for another tokenizer."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}{SHARD_SUFFIX}"


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def rows_to_batch(rows: Sequence[PackedRow]) -> pa.RecordBatch:
    """One record batch of rows, built from flat arrays and offsets (no per-token Python work)."""
    lengths = np.fromiter((r.num_tokens for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ShardError(f"{offsets[-1]} tokens do not fit one shard; use a smaller --rows-per-shard")
    offsets_arr = _int32_array(offsets)
    columns = [
        pa.ListArray.from_arrays(offsets_arr, _int32_array(np.concatenate([getattr(r, name) for r in rows])))
        for name in TOKEN_COLUMNS
    ]
    meta = {
        "num_branches": [r.num_branches for r in rows],
        "trunk_len": [r.trunk_len for r in rows],
        "num_tokens": lengths,
        "num_trained": [r.num_trained for r in rows],
    }
    columns += [_int32_array(np.asarray(meta[name])) for name in META_COLUMNS]
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def _int32_array(values: np.ndarray) -> pa.Array:
    """An Arrow int32 array over the numpy buffer (``pa.array`` would first import pandas to
    check for a Series, a noticeable start-up cost)."""
    data = np.ascontiguousarray(values, dtype=np.int32)
    return pa.Array.from_buffers(pa.int32(), len(data), [None, pa.py_buffer(data)])


def write_shard(directory: Path, index: int, rows: Sequence[PackedRow]) -> ShardFile:
    """Write one shard file atomically; return its manifest entry (name, rows, tokens, bytes, sha256)."""
    batch = rows_to_batch(rows)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, SCHEMA) as writer:
        writer.write_batch(batch)
    data = sink.getvalue()
    name = shard_name(index)
    atomic.write_bytes(directory / name, memoryview(data))
    num_tokens = batch.column("num_tokens").to_numpy()
    num_trained = batch.column("num_trained").to_numpy()
    return ShardFile(
        name=name,
        rows=len(rows),
        tokens=int(num_tokens.sum()),
        trained=int(num_trained.sum()),
        bytes=data.size,
        sha256=hashlib.sha256(memoryview(data)).hexdigest(),
    )


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Seal the directory: after this, readers accept it."""
    obj = manifest.to_json()
    atomic.write_json(directory / MANIFEST_NAME, {**obj, SEAL_KEY: manifest_seal(obj)})


def manifest_seal(manifest: dict[str, Any]) -> str:
    """The digest of every key of a manifest but the seal itself."""
    return sha256_text(canonical_json({k: v for k, v in manifest.items() if k != SEAL_KEY}))


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of a complete shard directory, checked for format, keys and their types."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardError(f"{directory}: no such shard directory (run plora tokenize first)")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        started = (directory / JOURNAL_NAME).exists() or any(directory.glob(f"shard-*{SHARD_SUFFIX}*"))
        if started:
            raise ShardError(f"{directory}: incomplete (no {MANIFEST_NAME}): run plora tokenize --resume")
        raise ShardError(f"{directory}: not a shard directory (no {MANIFEST_NAME}); run plora tokenize first")
    obj = read_object(path, ShardError)
    missing = missing_keys(obj, MANIFEST_SHAPE)
    if missing:
        raise ShardError(f"{path}: missing keys {', '.join(missing)}")
    if obj["format_version"] != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format_version {obj['format_version']!r}, this plora reads {FORMAT_VERSION} "
            "(a layout that changed, see docs/layout.md); re-run plora tokenize --overwrite"
        )
    problem = _shape_problem(obj)
    if problem:
        raise ShardError(f"{path}: damaged manifest: {problem}; re-run plora tokenize --overwrite")
    if not isinstance(obj.get(SEAL_KEY), str):
        raise ShardError(
            f"{path}: has no {SEAL_KEY}, so its packing facts cannot be trusted; "
            "re-run plora tokenize --overwrite"
        )
    return Manifest(
        plora_version=obj["plora_version"],
        tokenizer=obj["tokenizer"],
        chat_template=obj["chat_template"],
        special_tokens=obj["special_tokens"],
        packing=obj["packing"],
        convert=obj["convert"],
        rows_per_shard=obj["rows_per_shard"],
        fingerprint=obj["fingerprint"],
        files=tuple(ShardFile.from_json(entry) for entry in obj["files"]),
        num_rows=obj["num_rows"],
        num_tokens=obj["num_tokens"],
        num_trained=obj["num_trained"],
        meta_columns=tuple(obj["meta_columns"]),
        seal=obj[SEAL_KEY],
    )


def _shape_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a manifest (see MANIFEST_SHAPE), or None."""
    problem = fields_problem(manifest, MANIFEST_SHAPE)
    for key, shape in NESTED_SHAPE.items():
        problem = problem or fields_problem(manifest[key], shape, f"{key}.")
    for i, entry in enumerate(manifest["files"]):
        if problem is not None:
            break
        if not isinstance(entry, dict):
            problem = f"files[{i}] is {json_text(entry)}, expected an object"
            continue
        problem = fields_problem(entry, FILE_SHAPE, f"files[{i}].")
        name = entry["name"] if problem is None else ""
        if problem is None and (Path(name).name != name or name in ("", ".", "..")):
            problem = f"files[{i}].name {entry['name']!r} is not a file name in the directory"
    return problem


class _Batch:
    """Numpy views of one record batch's columns (zero-copy into the memory map)."""

    def __init__(self, batch: pa.RecordBatch):
        self.num_rows = batch.num_rows
        self.offsets: dict[str, np.ndarray] = {}
        self.values: dict[str, np.ndarray] = {}
        for name in TOKEN_COLUMNS:
            column = batch.column(name)
            self.offsets[name] = column.offsets.to_numpy()
            self.values[name] = column.values.to_numpy(zero_copy_only=True)
        self.meta = {name: batch.column(name).to_numpy(zero_copy_only=True) for name in META_COLUMNS}

    def tokens(self, name: str, index: int) -> np.ndarray:
        offsets = self.offsets[name]
        return self.values[name][offsets[index] : offsets[index + 1]]


class ShardSet:
    """A verified, memory-mapped shard directory. ``row(i)`` copies only row i out of the map."""

    def __init__(self, directory: Path, manifest: Manifest, *, verify: bool):
        self.directory = directory
        self.manifest = manifest
        self._maps: list[pa.MemoryMappedFile] = []
        self._batches: list[_Batch] = []
        self._open(verify)
        counts = np.fromiter((b.num_rows for b in self._batches), dtype=np.int64, count=len(self._batches))
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        if int(self._starts[-1]) != manifest.num_rows:
            raise ShardError(
                f"{directory}: the manifest says {manifest.num_rows} rows, "
                f"the files hold {int(self._starts[-1])}"
            )
        if manifest.seal != manifest_seal(manifest.to_json()):
            raise ShardError(
                f"{directory / MANIFEST_NAME}: changed after plora tokenize wrote it (its {SEAL_KEY} does "
                "not match its contents), so its packing facts cannot be trusted; "
                "re-run plora tokenize --overwrite"
            )
        if verify:
            self._check_packing()

    def _open(self, verify: bool) -> None:
        for entry in self.manifest.files:
            path = self.directory / entry.name
            if not path.is_file():
                raise ShardError(f"{path}: listed in {MANIFEST_NAME} but missing")
            size = path.stat().st_size
            if size != entry.bytes:
                raise ShardError(
                    f"{path}: {size} bytes, the manifest says {entry.bytes} (corrupt or replaced)"
                )
            if verify and file_sha256(path) != entry.sha256:
                raise ShardError(f"{path}: sha256 does not match the manifest (corrupt or replaced)")
            mapped = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_file(mapped)
            except pa.ArrowInvalid as err:
                raise ShardError(f"{path}: not an Arrow IPC file ({err})") from None
            if not reader.schema.remove_metadata().equals(SCHEMA.remove_metadata()):
                raise ShardError(f"{path}: unexpected columns {reader.schema.names}; expected {SCHEMA.names}")
            batches = [_Batch(reader.get_batch(i)) for i in range(reader.num_record_batches)]
            rows = sum(b.num_rows for b in batches)
            if rows != entry.rows:
                raise ShardError(f"{path}: holds {rows} rows, the manifest says {entry.rows}")
            self._maps.append(mapped)
            self._batches.extend(batches)

    def _check_packing(self) -> None:
        """Refuse a manifest whose packing facts the rows contradict (see :func:`_packing_problem`)."""
        packing = self.manifest.packing
        for batch in self._batches:
            problem = _packing_problem(batch, packing)
            if problem is not None:
                raise ShardError(
                    f"{self.directory / MANIFEST_NAME}: says {problem}; re-run plora tokenize --overwrite"
                )

    def __len__(self) -> int:
        return int(self._starts[-1])

    def row(self, index: int) -> PackedRow:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"row {index} out of range for {n} rows")
        index %= n
        b = int(np.searchsorted(self._starts, index, side="right")) - 1
        batch, local = self._batches[b], index - int(self._starts[b])
        ids, branch, time, labels = (batch.tokens(name, local).copy() for name in TOKEN_COLUMNS)
        return PackedRow(
            input_ids=ids,
            branch_id=branch,
            time_id=time,
            labels=labels,
            num_branches=int(batch.meta["num_branches"][local]),
            trunk_len=int(batch.meta["trunk_len"][local]),
        )

    def metadata(self) -> dict[str, np.ndarray]:
        """``num_branches``, ``trunk_len``, ``num_tokens``, ``num_trained`` of every row, in row order."""
        return {
            name: np.concatenate([b.meta[name] for b in self._batches] or [np.zeros(0, np.int32)])
            for name in META_COLUMNS
        }

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer that does not give the ids the shards were built with."""
        check_same_tokenizer(self.manifest.tokenizer, tokenizer, what=f"shards {self.directory}")

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps do not pickle (DataLoader workers): reopen them on the other side.
        return {"directory": self.directory, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        ShardSet.__init__(self, state["directory"], state["manifest"], verify=False)


def _packing_problem(batch: _Batch, packing: dict[str, Any]) -> str | None:
    """How one record batch's rows contradict the manifest's packing (its alignment, longest
    sequence and widest dynamic row), or None. Rows are stored branch-contiguous, each sequence in
    time order, so a sequence is a run of equal (row, branch_id)."""
    align = packing["align"]
    if align not in ALIGN_MODES:
        return f"align {align!r}, which is none of {', '.join(ALIGN_MODES)}"
    branch, time = batch.values["branch_id"], batch.values["time_id"]
    if not len(branch):
        return None
    row = np.repeat(np.arange(batch.num_rows), np.diff(batch.offsets["branch_id"]))
    new = np.ones(len(branch), dtype=bool)
    new[1:] = (branch[1:] != branch[:-1]) | (row[1:] != row[:-1])
    firsts = np.flatnonzero(new)
    lasts = np.append(firsts[1:], len(branch)) - 1
    longest = int((lasts - firsts + 1).max())
    if longest > packing["max_seq_len"]:
        return f"max_seq_len {packing['max_seq_len']}, but a sequence holds {longest} tokens"
    widest = int(batch.meta["num_branches"].max(initial=0))
    if 0 < packing["max_branches"] < widest:
        return f"max_branches {packing['max_branches']}, but a row holds {widest} branches"
    seq_row = row[firsts]
    is_branch = (branch[firsts] > 0) | (batch.meta["trunk_len"][seq_row] == 0)
    edge = (time[firsts] if align == "left" else time[lasts])[is_branch]
    rows = seq_row[is_branch]
    low = np.full(batch.num_rows, np.iinfo(np.int64).max)
    high = np.full(batch.num_rows, np.iinfo(np.int64).min)
    np.minimum.at(low, rows, edge)
    np.maximum.at(high, rows, edge)
    if np.any(low[rows] != high[rows]):
        edge_name = "start" if align == "left" else "end"
        return f"align {align!r}, but the branches of a row do not {edge_name} together"
    return None


def open_shards(directory: str | Path, *, verify: bool = True) -> ShardSet:
    """Open a complete shard directory. ``verify`` also checks every file's sha256 (reads all bytes)."""
    directory = Path(directory)
    return ShardSet(directory, read_manifest(directory), verify=verify)


# The trainer gathers whole micro-batches with numpy fancy indexing, so it needs the flat (zero-copy)
# value arrays and row offsets of each record batch rather than one row at a time.
def flat_columns(shards: ShardSet) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Per record batch, in row order: (row offsets ``[rows + 1]``, {token column: flat values})."""
    out = []
    for batch in shards._batches:
        offsets = batch.offsets[TOKEN_COLUMNS[0]]
        if any(not np.array_equal(batch.offsets[name], offsets) for name in TOKEN_COLUMNS[1:]):
            raise ShardError(f"{shards.directory}: token columns of a row differ in length (corrupt shard)")
        out.append((offsets, batch.values))
    return out
