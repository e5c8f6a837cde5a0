"""Reading shard directories: the Arrow files, the manifest checks, and the tokenizer check."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from cli_helpers import one_line_error, run_cli

from parallel.errors import Rejects
from parallel.fingerprint import TokenizerMismatch, check_same_tokenizer, tokenizer_identity
from parallel.layout import META_COLUMNS, TOKEN_COLUMNS, PackingOptions
from parallel.tokenizer import load_tokenizer
from pipeline.shards import ShardError, open_shards
from pipeline.tokenize import TokenizeJob, tokenize_to_shards

RECORDS = [
    {"text": "A first text about rivers and the mills that stood along them."},
    {
        "messages": [
            {"role": "user", "content": "Why is the sky blue?"},
            {"role": "assistant", "content": "Scattering."},
        ]
    },
    {
        "main": "Two ways to rest:",
        "branches": ["Sleep early.", {"prompt": "Or: ", "response": "walk outside."}],
    },
    {"text": "A second text, long enough to need a split when branches are short. " * 3},
    {"text": "A third text."},
]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    base = tmp_path_factory.mktemp("shards")
    source = base / "records.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    job = TokenizeJob(
        (source,),
        tiny_model_dir,
        base / "out",
        packing=PackingOptions(branches=2, max_seq_len=16),
        rows_per_shard=3,
    )
    tokenize_to_shards(job, Rejects(), progress=False)
    return base / "out"


@pytest.fixture
def copy(shard_dir: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(shard_dir, tmp_path / "copy"))


def test_files_are_arrow_ipc_and_rows_read_back(shard_dir: Path) -> None:
    shards = open_shards(shard_dir)
    manifest = shards.manifest
    assert len(manifest.files) > 1 and len(shards) == manifest.num_rows
    rows_from_arrow = []
    for entry in manifest.files:
        table = pa.ipc.open_file(pa.memory_map(str(shard_dir / entry.name))).read_all()
        assert table.num_rows == entry.rows
        for name in TOKEN_COLUMNS:
            assert table.schema.field(name).type == pa.list_(pa.int32())
        for name in META_COLUMNS:
            assert table.schema.field(name).type == pa.int32()
        rows_from_arrow += table.to_pylist()
    meta = shards.metadata()
    for i, expected in enumerate(rows_from_arrow):
        row = shards.row(i)
        for name in TOKEN_COLUMNS:
            assert getattr(row, name).tolist() == expected[name]
        assert (row.num_branches, row.trunk_len) == (expected["num_branches"], expected["trunk_len"])
        assert (row.num_tokens, row.num_trained) == (expected["num_tokens"], expected["num_trained"])
        for name in META_COLUMNS:
            assert meta[name][i] == expected[name]
    assert int(meta["num_tokens"].sum()) == manifest.num_tokens
    assert int(meta["num_trained"].sum()) == manifest.num_trained
    assert np.array_equal(shards.row(-1).input_ids, shards.row(len(shards) - 1).input_ids)
    with pytest.raises(IndexError):
        shards.row(len(shards))


def test_rows_are_private_copies_and_the_set_pickles(shard_dir: Path) -> None:
    shards = open_shards(shard_dir)
    row = shards.row(0)
    row.input_ids[:] = -1  # a caller may change its row without changing the shards
    assert (shards.row(0).input_ids >= 0).all()
    again = pickle.loads(pickle.dumps(shards))  # DataLoader workers
    assert len(again) == len(shards)
    assert np.array_equal(again.row(1).labels, shards.row(1).labels)


def test_missing_and_incomplete_directories_are_refused(copy: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="no such shard directory"):
        open_shards(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="not a shard directory"):
        open_shards(tmp_path / "empty")
    (copy / "manifest.json").unlink()
    with pytest.raises(ShardError, match=r"incomplete .*run plora tokenize --resume"):
        open_shards(copy)


def test_damaged_files_are_refused(copy: Path) -> None:
    first = copy / "shard-00000.arrow"
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00000.arrow: sha256 does not match"):
        open_shards(copy)
    (copy / "shard-00001.arrow").write_bytes(b"short")
    with pytest.raises(ShardError, match="shard-00001.arrow: 5 bytes"):
        open_shards(copy, verify=False)
    (copy / "shard-00001.arrow").unlink()
    with pytest.raises(ShardError, match="shard-00001.arrow: listed in manifest.json but missing"):
        open_shards(copy, verify=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(format_version=99), "format_version 99"),
        (lambda m: m.pop("fingerprint"), "missing keys fingerprint"),
        (lambda m: m.pop("chat_template"), "missing keys chat_template"),
        (lambda m: m.update(num_rows=m["num_rows"] + 1), "rows"),
        (lambda m: m["files"][0].update(rows=m["files"][0]["rows"] + 1), "rows"),
    ],
)
def test_manifest_problems_are_refused(copy: Path, change: object, message: str) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)  # type: ignore[operator]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=message):
        open_shards(copy)


BADLY_SHAPED = {
    "file without bytes": (lambda m: m["files"][0].pop("bytes"), r"files\[0\]\.bytes is missing"),
    "files not a list": (lambda m: m.update(files="x"), r'files is "x", expected a list'),
    "count not an int": (lambda m: m.update(num_rows="12"), r'num_rows is "12", expected an integer'),
    "tokenizer without vocab": (
        lambda m: m["tokenizer"].pop("vocab_size"),
        r"tokenizer\.vocab_size is missing",
    ),
    "file entry not an object": (lambda m: m["files"].append(3), r"files\[\d+\] is 3, expected an object"),
    "identity without version": (lambda m: m["tokenizer"].pop("version"), r"tokenizer\.version is missing"),
    "file name a path": (lambda m: m["files"][0].update(name="../x.arrow"), r"is not a file name"),
}


@pytest.mark.parametrize(("change", "message"), BADLY_SHAPED.values(), ids=BADLY_SHAPED.keys())
def test_badly_shaped_manifest_is_one_line_error(copy: Path, change: object, message: str) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)  # type: ignore[operator]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    error = one_line_error(run_cli("inspect", copy))
    assert f"{copy / 'manifest.json'}: damaged manifest: " in error
    assert re.search(message, error), error


def test_manifest_that_is_not_json_is_refused(copy: Path) -> None:
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json: not valid JSON"):
        open_shards(copy)


def test_check_tokenizer_compares_the_ids_not_the_chat_template(
    shard_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    template = tmp_path / "other.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    # Shards tokenized with --chat-template FILE are read (trained on) with the plain tokenizer:
    # training never renders a chat, so only the ids matter.
    job = TokenizeJob(
        (shard_dir.parent / "records.jsonl",),
        tiny_model_dir,
        tmp_path / "templated",
        packing=PackingOptions(branches=2, max_seq_len=16),
        chat_template=template,
    )
    tokenize_to_shards(job, Rejects(), progress=False)
    templated = open_shards(tmp_path / "templated")
    recorded = {"file": str(template.resolve()), "template": template.read_text()}
    assert templated.manifest.chat_template == recorded
    plain, other = load_tokenizer(tiny_model_dir), load_tokenizer(tiny_model_dir, template)
    for shards in (open_shards(shard_dir), templated):
        shards.check_tokenizer(plain)
        shards.check_tokenizer(other)
    # The template still decides how chats are tokenized: it is part of the run fingerprint.
    ours = open_shards(shard_dir).manifest
    assert templated.manifest.tokenizer["vocab_sha256"] == ours.tokenizer["vocab_sha256"]
    assert templated.manifest.tokenizer["sha256"] != ours.tokenizer["sha256"]
    assert templated.manifest.digest != ours.digest


def test_check_tokenizer_refuses_another_vocabulary(shard_dir: Path, tiny_model_dir: Path) -> None:
    grown = load_tokenizer(tiny_model_dir)
    grown.add_tokens(["<extra-token>"])
    with pytest.raises(TokenizerMismatch) as caught:
        open_shards(shard_dir).check_tokenizer(grown)
    message = str(caught.value)
    want = open_shards(shard_dir).manifest.tokenizer["vocab_sha256"][:12]
    assert "\n" not in message and str(shard_dir) in message and "re-run plora tokenize" in message
    assert want in message and message.count("vocab_sha256") == 2


def test_identity_of_another_version_is_named_not_called_foreign(
    shard_dir: Path, tiny_model_dir: Path
) -> None:
    shards = open_shards(shard_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    old = {"version": 1, "name_or_path": "x", "vocab_size": 1, "sha256": "0" * 64}
    shards.manifest = dataclasses.replace(shards.manifest, tokenizer=old)
    stale = r"identity version 1, this plora computes version 2: re-run plora tokenize"
    with pytest.raises(TokenizerMismatch, match=stale):
        shards.check_tokenizer(tokenizer)
    with pytest.raises(TokenizerMismatch, match=r"^adapter a: recorded with tokenizer identity version 7"):
        check_same_tokenizer({"version": 7}, tokenizer, what="adapter a")
    with pytest.raises(TokenizerMismatch, match=r"^the shards: recorded with no tokenizer identity version,"):
        check_same_tokenizer(tokenizer_identity(tokenizer), {}, what="adapter a", against="the shards")
    check_same_tokenizer(tokenizer_identity(tokenizer), tokenizer, what="adapter a")
