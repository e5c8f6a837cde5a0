"""The resume journal of `plora tokenize`, and what a run does with what its --out already holds.

Resume: after each shard is written, a journal (``.progress.npz``, replaced atomically) records
the fingerprint, the finished files, how many records were consumed and everything the packer
held at that point (pending pieces, the next row size, the RNG state, and rows produced but not
yet written). ``--resume`` re-reads the inputs, skips the consumed records without tokenizing
them, restores that state and continues, so the shards come out byte-identical to an
uninterrupted run. ``manifest.json`` is written last; until then the directory is incomplete.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parallel import atomic, outdir
from parallel.errors import PloraError
from parallel.fingerprint import file_sha256
from parallel.layout import (
    MANIFEST_NAME,
    SHARD_SUFFIX,
    TOKEN_COLUMNS,
    TOKEN_DTYPE,
    PackedRow,
    PackerState,
    TokenSequence,
)
from pipeline.shards import JOURNAL_NAME, Manifest, ShardError, ShardFile, read_manifest

__all__ = ["Journal", "start_state"]


@dataclass
class Journal:
    """What an interrupted run leaves for --resume (see the module docstring)."""

    digest: str
    files: list[ShardFile]
    records_consumed: int
    packer: PackerState
    buffer: list[PackedRow]
    encode_rejects: list[list[Any]]  # [source, line, reason] of records the encoder rejected

    def to_bytes(self) -> bytes:
        header = {
            "digest": self.digest,
            "files": [f.to_json() for f in self.files],
            "records_consumed": self.records_consumed,
            "target": self.packer.target,
            "rng": self.packer.rng,
            "counts": self.packer.counts,
            "encode_rejects": self.encode_rejects,
            "buffer_meta": [[r.num_branches, r.trunk_len] for r in self.buffer],
        }
        pending = self.packer.pending
        arrays: dict[str, np.ndarray] = {
            "header": np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8),
            "pending_lens": np.asarray([len(p) for p in pending], dtype=np.int64),
            "pending_ids": _concat([p.ids for p in pending], TOKEN_DTYPE),
            "pending_trained": _concat([p.trained for p in pending], bool),
            "buffer_lens": np.asarray([r.num_tokens for r in self.buffer], dtype=np.int64),
        }
        for name in TOKEN_COLUMNS:
            arrays[f"buffer_{name}"] = _concat([getattr(r, name) for r in self.buffer], TOKEN_DTYPE)
        sink = io.BytesIO()
        np.savez(sink, **arrays)  # type: ignore[arg-type]  # numpy's stub matches **kwds to allow_pickle
        return sink.getvalue()

    @staticmethod
    def from_file(path: Path) -> Journal:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
            header = json.loads(arrays["header"].tobytes().decode("utf-8"))
        except Exception as err:  # noqa: BLE001 - any damage means the same: cannot resume
            raise PloraError(
                f"{path}: unreadable resume journal ({err}); use --overwrite to start over"
            ) from None
        cuts = np.cumsum(arrays["pending_lens"])[:-1]
        pending = (
            tuple(
                TokenSequence(ids, trained)
                for ids, trained in zip(
                    np.split(arrays["pending_ids"], cuts),
                    np.split(arrays["pending_trained"], cuts),
                    strict=True,
                )
            )
            if len(arrays["pending_lens"])
            else ()
        )
        buffer = []
        if len(arrays["buffer_lens"]):
            cuts = np.cumsum(arrays["buffer_lens"])[:-1]
            columns = [np.split(arrays[f"buffer_{name}"], cuts) for name in TOKEN_COLUMNS]
            for (ids, branch, time_, labels), (k, trunk) in zip(
                zip(*columns, strict=True), header["buffer_meta"], strict=True
            ):
                buffer.append(PackedRow(ids, branch, time_, labels, num_branches=k, trunk_len=trunk))
        return Journal(
            digest=header["digest"],
            files=[ShardFile.from_json(f) for f in header["files"]],
            records_consumed=header["records_consumed"],
            packer=PackerState(
                pending=pending, target=header["target"], rng=header["rng"], counts=header.get("counts", {})
            ),
            buffer=buffer,
            encode_rejects=header["encode_rejects"],
        )


def _concat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)


def _own_files(directory: Path) -> list[Path]:
    """Files `plora tokenize` writes in a shard directory, manifest first (so that removing them
    in this order never leaves a sealed directory with missing shards)."""
    found: list[Path] = []
    for name in (MANIFEST_NAME, JOURNAL_NAME):
        found += [directory / name] if (directory / name).exists() else []
        found += atomic.temporaries(directory, name)
    shards = f"shard-*{SHARD_SUFFIX}"
    return found + sorted(directory.glob(shards)) + atomic.temporaries(directory, shards)


def _holds_only_own_files(directory: Path) -> bool:
    return set(directory.iterdir()) <= set(_own_files(directory))


def _changed_parts(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = ("inputs", "tokenizer", "options", "plora", "format")
    names = [key for key in keys if old.get(key) != new.get(key)]
    return ", ".join(names) or "digest"


def _interrupted(out: Path) -> PloraError:
    return PloraError(
        f"{out}: holds an interrupted run (incomplete: no {MANIFEST_NAME}); "
        "pass --resume to finish it or --overwrite to start over"
    )


def start_state(
    out: Path, fingerprint: dict[str, Any], *, resume: bool, overwrite: bool
) -> Journal | Manifest | None:
    """Decide what to do with what is already in ``out``: the manifest of an up-to-date
    directory, a journal to resume from, or None (start afresh, after clearing old shards)."""
    if resume and overwrite:
        raise PloraError("--resume and --overwrite contradict each other; pass one")
    manifest_path, journal_path = out / MANIFEST_NAME, out / JOURNAL_NAME
    if overwrite:
        for path in _own_files(out):
            path.unlink()
        return None
    if manifest_path.exists():
        manifest = read_manifest(out)
        old = manifest.fingerprint
        if old.get("digest") == fingerprint["digest"]:
            journal_path.unlink(missing_ok=True)  # a run killed between sealing and cleaning up
            return manifest
        raise PloraError(
            f"{out}: holds shards built from other {_changed_parts(old, fingerprint)}; "
            "pass --overwrite to replace them (or choose another --out)"
        )
    if journal_path.exists():
        journal = Journal.from_file(journal_path)
        if not resume:
            raise _interrupted(out)
        if journal.digest != fingerprint["digest"]:
            raise PloraError(
                f"{out}: the interrupted run there was started with other inputs, tokenizer or options; "
                "pass --overwrite to start over"
            )
        for entry in journal.files:
            path = out / entry.name
            if not path.is_file() or file_sha256(path) != entry.sha256:
                raise ShardError(
                    f"{path}: missing or changed since it was written; pass --overwrite to start over"
                )
        done = {entry.name for entry in journal.files}
        for path in _own_files(out):  # a shard written after the last journal entry, and temporaries
            if path.name not in done and path.name != JOURNAL_NAME:
                path.unlink()
        return journal
    outdir.refuse_foreign(out, "--out", False, _holds_only_own_files, overwrite_does="write into it anyway")
    leftovers = _own_files(out)
    if leftovers and not resume:
        raise _interrupted(out)
    for path in leftovers:  # interrupted before its first journal: nothing to keep
        path.unlink()
    return None
