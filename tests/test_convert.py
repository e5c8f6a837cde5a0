"""`plora convert`: every container x every format, roles, modes, datasets, rejects and summaries."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_cli, run_plora
from inputs import (
    CONTAINERS,
    DETECTED,
    SAMPLES,
    assistant,
    read_jsonl,
    system,
    user,
    write_jsonl,
    write_parquet,
)

from parallel.errors import InputError, PloraError, Rejects
from parallel.layout import (
    ChatRecord,
    ParallelRecord,
    RecordError,
    TextRecord,
    parse_record,
    record_to_json,
)
from pipeline import formats
from pipeline.convert import (
    ConvertOptions,
    convert,
    default_rejects_path,
    input_fingerprint_parts,
    iter_records,
    open_rejects,
)


def converted(inputs, options=None, rejects=None, hf_dataset=None) -> list[dict]:
    records = iter_records(inputs, options or ConvertOptions(), rejects or Rejects("raise"), hf_dataset)
    return [record_to_json(item.record) for item in records]


# --------------------------------------------------------------------------------------
# Containers x formats
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_every_container_reads_every_format(tmp_path: Path, container: str, fmt: str) -> None:
    suffix, write = CONTAINERS[container]
    raw, expected = SAMPLES[fmt]
    path = write(tmp_path / f"in{suffix}", raw)
    assert converted([path]) == expected
    forced = ConvertOptions(fmt=DETECTED[fmt])
    assert converted([path], forced) == expected


def test_table_mixing_formats_reads_null_columns_as_absent(tmp_path: Path) -> None:
    alpaca, text = SAMPLES["alpaca"], SAMPLES["text"]
    path = write_parquet(tmp_path / "mixed.parquet", alpaca[0] + text[0])
    assert converted([path]) == alpaca[1] + text[1]


def test_txt_blocks_and_lines_with_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "doc.txt"
    path.write_bytes(b"\xef\xbb\xbfFirst para,\r\nsecond line.\r\n\r\n  \r\nSecond para.\r\n\r\n\r\nThird.")
    items = list(iter_records([path], ConvertOptions(), Rejects("raise")))
    assert [record_to_json(i.record) for i in items] == [
        {"text": "First para,\nsecond line."},
        {"text": "Second para."},
        {"text": "Third."},
    ]
    assert [i.line for i in items] == [1, 5, 8]
    by_line = converted([path], ConvertOptions(txt_split="line"))
    assert by_line == [{"text": t} for t in ("First para,", "second line.", "Second para.", "Third.")]


def test_json_array_elements_keep_their_file_lines(tmp_path: Path) -> None:
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"text": "a"},\n\n  {"text":\n "b"}, {"text": ""}\n]\n', encoding="utf-8")
    with pytest.raises(InputError) as err:
        converted([path])
    assert (err.value.source, err.value.line) == (str(path), 5)
    items = list(iter_records([path], ConvertOptions(), Rejects("skip")))
    assert [i.line for i in items] == [2, 4]


def test_json_file_holding_json_lines_is_read_as_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    path.write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    assert converted([path]) == [{"text": "one"}, {"text": "two"}]


def test_single_object_json_file_is_one_record(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text('{"prompt": "p", "response": "r"}', encoding="utf-8")
    assert converted([path]) == [{"messages": [user("p"), assistant("r")]}]


def test_json_file_of_one_chat_is_one_record_and_a_wrapper_is_unwrapped(tmp_path: Path) -> None:
    chat = [user("Hi"), assistant("Hello."), user("Bye"), assistant("See you.")]
    for key in ("messages", "conversations"):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({key: chat}, indent=1), encoding="utf-8")
        assert converted([path]) == [{"messages": chat}]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"messages": chat}, {"text": "t"}]}, indent=1), encoding="utf-8")
    assert converted([wrapped]) == [{"messages": chat}, {"text": "t"}]


def test_inputs_are_read_in_order(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    b = tmp_path / "b.txt"
    b.write_text("b1\n\nb2\n", encoding="utf-8")
    assert converted([b, a]) == [{"text": t} for t in ("b1", "b2", "a1", "a2")]


def test_real_alpaca_file(shared_file) -> None:
    path = shared_file("alpaca_2k.json")
    records = converted([path])
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert len(records) == len(raw)
    first = raw[0]
    want_user = first["instruction"] + (f"\n\n{first['input']}" if first["input"].strip() else "")
    assert records[0] == {"messages": [user(want_user), assistant(first["output"])]}


# --------------------------------------------------------------------------------------
# Formats: detection, roles, modes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_detect(fmt: str) -> None:
    raw, _ = SAMPLES[fmt]
    assert {formats.detect(r) for r in raw} == {DETECTED[fmt]}


@pytest.mark.parametrize("obj", [{"foo": 1}, [1, 2], "text", None, {}])
def test_detect_finds_nothing(obj) -> None:
    assert formats.detect(obj) is None


@pytest.mark.parametrize(
    ("role", "canonical"),
    [
        ("human", "user"),
        ("Human", "user"),
        ("USER", "user"),
        ("gpt", "assistant"),
        ("bot", "assistant"),
        ("model", "assistant"),
        ("ai", "assistant"),
        (" assistant ", "assistant"),
        ("System", "system"),
    ],
)
def test_roles_are_normalised(role: str, canonical: str) -> None:
    turns = [{"from": role, "value": "x"}, {"from": "gpt", "value": "y"}]
    record = formats.normalise({"conversations": turns}, "sharegpt")
    assert isinstance(record, ChatRecord)
    assert record.messages[0].role == canonical


def test_unknown_role_names_it_and_the_accepted_ones() -> None:
    obj = {"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]}
    expected = r"unknown role: turn 0 has role 'tool'; expected one of .*human.*gpt"
    with pytest.raises(RecordError, match=expected):
        formats.normalise(obj, "messages")


def test_openai_content_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world."}]
    obj = {"messages": [user("hi"), {"role": "assistant", "content": parts}]}
    record = formats.normalise(obj, "messages")
    assert record_to_json(record)["messages"][1] == assistant("Hello, world.")


def test_canonical_parallel_with_prompt_response_branches(tmp_path: Path) -> None:
    obj = {"main": "Q:", "branches": [{"prompt": "think", "response": "A"}, "B"]}
    record = formats.normalise(obj, "canonical")
    assert isinstance(record, ParallelRecord)
    assert record_to_json(record) == {"main": "Q:", "branches": [{"prompt": "think", "response": "A"}, "B"]}


def test_extra_keys_are_ignored() -> None:
    obj = {"text": "body", "id": 3, "meta": {"url": "x"}}
    assert record_to_json(formats.normalise(obj, "text")) == {"text": "body"}
    assert record_to_json(formats.normalise(obj, "canonical")) == {"text": "body"}
    parallel = {"id": 7, "main": "m", "branches": ["b"]}
    assert formats.detect(parallel) == "canonical"
    assert record_to_json(formats.normalise(parallel, "canonical")) == {"main": "m", "branches": ["b"]}


def test_extra_columns_of_non_canonical_formats_still_convert(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "with_ids.jsonl",
        [
            {"id": 1, "instruction": "Say hi.", "input": "", "output": "Hi!", "text": "### Say hi. Hi!"},
            {"id": "b2", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
            {"id": 3, "messages": [user("q"), assistant("a")], "source": "web"},
        ],
    )
    assert converted([path]) == [
        {"messages": [user("Say hi."), assistant("Hi!")]},
        {"messages": [user("Q"), assistant("A")]},
        {"messages": [user("q"), assistant("a")]},
    ]


def test_a_forced_format_reads_an_ambiguous_record() -> None:
    obj = {"text": "rendered", "messages": [user("q"), assistant("a")]}
    assert formats.detect(obj) is None
    assert record_to_json(formats.normalise(obj, "messages")) == {"messages": [user("q"), assistant("a")]}
    assert record_to_json(formats.normalise(obj, "text")) == {"text": "rendered"}


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"main": "m", "branches": ["b"], "text": "t"}, r"keys \['branches', 'main', 'text'\] mix"),
        ({"text": "t", "messages": [assistant("a")]}, r"keys \['messages', 'text'\] mix text and messages"),
        ({"text": "t", "id": 1}, r"unexpected keys \['id'\]; a record is one of"),
        ({"branches": ["b"], "meta": {}}, r"unexpected keys \['meta'\]"),
    ],
)
def test_canonical_record_has_the_keys_of_one_kind_only(obj: dict, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        parse_record(obj)


def test_forced_format_rejects_what_it_does_not_fit() -> None:
    with pytest.raises(RecordError, match="missing field: 'instruction'"):
        formats.normalise({"text": "plain"}, "alpaca")


def test_pretrain_mode_flattens_chats_and_keeps_parallel_records(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mix.jsonl",
        [
            {"messages": [system("S."), user("U."), assistant("A.")]},
            {"instruction": "I.", "input": "In.", "output": "O."},
            {"prompt": "P.", "response": "R."},
            {"text": "T."},
            {"main": "M.", "branches": ["B1.", "B2."]},
        ],
    )
    assert converted([path], ConvertOptions(mode="pretrain")) == [
        {"text": "S.\n\nU.\n\nA."},
        {"text": "I.\n\nIn.\n\nO."},
        {"text": "P.\n\nR."},
        {"text": "T."},
        {"main": "M.", "branches": ["B1.", "B2."]},
    ]
    chat = {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}
    record = formats.normalise(chat, "sharegpt", "pretrain")
    assert record == TextRecord("h\n\ng")


def test_options_are_validated() -> None:
    for bad in ({"fmt": "yaml"}, {"mode": "chat"}, {"txt_split": "page"}):
        with pytest.raises(PloraError, match="must be one of"):
            ConvertOptions(**bad)


# --------------------------------------------------------------------------------------
# HuggingFace datasets (local only: no hub here)
# --------------------------------------------------------------------------------------


def test_dataset_saved_to_disk(tmp_path: Path) -> None:
    import datasets

    raw, expected = SAMPLES["sharegpt"]
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(raw), "test": datasets.Dataset.from_list(raw[:1])}
    ).save_to_disk(str(folder))
    assert converted([], hf_dataset=str(folder)) == expected
    assert converted([], ConvertOptions(hf_split="test"), hf_dataset=str(folder)) == expected[:1]
    assert converted([], ConvertOptions(streaming=True), hf_dataset=str(folder)) == expected


def test_dataset_folder_of_data_files(tmp_path: Path, monkeypatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "folder"
    folder.mkdir()
    raw, expected = SAMPLES["alpaca"]
    write_jsonl(folder / "train.jsonl", raw)
    assert converted([], hf_dataset=str(folder)) == expected
    assert converted([], ConvertOptions(streaming=True, mode="pretrain"), hf_dataset=str(folder)) == [
        {"text": "Add the numbers.\n\n2 and 3\n\n5"},
        {"text": "Be kind.\n\nSay hi.\n\nHi!"},
    ]


def test_dataset_that_cannot_load_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text("{}", encoding="utf-8")
    with pytest.raises(PloraError, match=r"saved\[train\]: cannot load the HuggingFace dataset") as err:
        converted([], hf_dataset=str(folder))
    assert "\n" not in str(err.value)


def test_cli_hf_dataset_without_the_datasets_package(tmp_path: Path, plora_bin: Path) -> None:
    # A `datasets` that cannot be imported, first on the path: as on a machine without the package.
    shim = tmp_path / "shim" / "datasets"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'datasets'\")\n")
    path = os.pathsep.join(filter(None, [str(tmp_path / "shim"), os.environ.get("PYTHONPATH")]))
    # a real process: the shim must come before the installed package at import
    done = run_plora(plora_bin, "convert", "--hf-dataset", tmp_path, env={"PYTHONPATH": path})
    error = one_line_error(done)
    assert error == "plora: error: --hf-dataset needs the 'hf' extra: pip install 'plora[hf]'"


# --------------------------------------------------------------------------------------
# convert(): output, rejects, summary, fingerprints
# --------------------------------------------------------------------------------------


def _mixed_inputs(tmp_path: Path) -> list[Path]:
    good_and_bad = tmp_path / "a.jsonl"
    good_and_bad.write_bytes(
        b'{"text": "one"}\n'
        b"not json\n"
        b'{"text": "  "}\n'
        b'{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
        b'{"instruction": "I", "output": "O"}\n'
        b'{"text": "caf\xe9"}\n'
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    text = tmp_path / "b.txt"
    text.write_text("doc one\n\ndoc two\n", encoding="utf-8")
    return [good_and_bad, empty, text]


def test_convert_skip_writes_rejects_and_counts(tmp_path: Path) -> None:
    inputs = _mixed_inputs(tmp_path)
    out = tmp_path / "out" / "records.jsonl"
    rejects = open_rejects("skip", out)
    assert rejects.path == tmp_path / "out" / "records.rejects.jsonl" == default_rejects_path(out)
    summary = convert(inputs, out, ConvertOptions(), rejects, progress=False)

    assert read_jsonl(out) == [
        {"text": "one"},
        {"messages": [user("I"), assistant("O")]},
        {"text": "doc one"},
        {"text": "doc two"},
    ]
    entries = read_jsonl(rejects.path)
    assert [(e["source"], e["line"]) for e in entries] == [(str(inputs[0]), n) for n in (2, 3, 4, 6)]
    kinds = [e["reason"].split(":")[0] for e in entries]
    assert kinds == ["invalid JSON", "empty text", "unknown role", "invalid UTF-8"]
    assert entries[0]["raw"] == "not json"
    assert entries[2]["raw"]["messages"][0]["role"] == "tool"

    assert (summary.records_in, summary.records_out, summary.records_rejected) == (8, 4, 4)
    assert summary.records_in == summary.records_out + summary.records_rejected
    counts = {source: (c.read, c.written, c.rejected) for source, c in summary.inputs.items()}
    assert counts == {str(inputs[0]): (6, 2, 4), str(inputs[1]): (0, 0, 0), str(inputs[2]): (2, 2, 0)}
    assert summary.rejected == {"invalid JSON": 1, "empty text": 1, "unknown role": 1, "invalid UTF-8": 1}
    assert summary.formats == {"text": 3, "alpaca": 1}
    text = "\n".join(summary.lines(out, rejects.path))
    assert "8 records in, 4 out, 4 rejected" in text
    assert f"{inputs[1]}: 0 in, 0 out, 0 rejected (no records found)" in text
    assert f"details in {rejects.path}" in text


def test_rejected_table_row_with_dates_reaches_the_rejects_file(tmp_path: Path) -> None:
    day = datetime.datetime(2024, 5, 17, 8, 30)
    path = write_parquet(tmp_path / "t.parquet", [{"text": "kept", "day": day}, {"text": " ", "day": day}])
    out = tmp_path / "o.jsonl"
    rejects = open_rejects("skip", out)
    summary = convert([path], out, ConvertOptions(), rejects, progress=False)
    assert read_jsonl(out) == [{"text": "kept"}]
    [entry] = read_jsonl(rejects.path)
    assert (entry["line"], entry["raw"]) == (2, {"text": " ", "day": str(day)})
    assert summary.rejected == {"empty text": 1}


def test_convert_raise_leaves_no_output(tmp_path: Path) -> None:
    inputs = _mixed_inputs(tmp_path)
    out = tmp_path / "records.jsonl"
    out.write_text("previous\n", encoding="utf-8")
    with pytest.raises(InputError, match="invalid JSON"):
        convert(inputs, out, ConvertOptions(), Rejects("raise"), progress=False)
    assert out.read_text(encoding="utf-8") == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.txt", "empty.jsonl", "records.jsonl"]


def test_convert_to_stdout(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"prompt": "p", "response": "r"}])
    summary = convert([path], None, ConvertOptions(), Rejects("raise"), progress=True)
    written = read_jsonl_text(capsys.readouterr().out)
    assert written == [{"text": "x"}, {"messages": [user("p"), assistant("r")]}]
    assert summary.records_out == 2


def read_jsonl_text(text: str) -> list:
    return [json.loads(line) for line in text.splitlines()]


def test_stale_rejects_file_is_cleared(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}])
    out = tmp_path / "o.jsonl"
    default_rejects_path(out).write_text('{"old": 1}\n', encoding="utf-8")
    rejects = open_rejects("skip", out)
    convert([path], out, ConvertOptions(), rejects, progress=False)
    assert rejects.path.read_text(encoding="utf-8") == ""


def test_skip_to_stdout_needs_a_rejects_file() -> None:
    with pytest.raises(PloraError, match="needs --rejects"):
        open_rejects("skip", None)


def test_input_fingerprint_parts_follow_bytes(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "y"}])
    first = input_fingerprint_parts([a], str(folder))
    assert [name for name, _ in first] == [str(a), f"{folder}[:train]"]
    assert first == input_fingerprint_parts([a], str(folder))
    write_jsonl(a, [{"text": "z"}])
    write_jsonl(folder / "train.jsonl", [{"text": "w"}])
    second = input_fingerprint_parts([a], str(folder))
    assert all(x[1] != y[1] for x, y in zip(first, second, strict=True))
    hub = input_fingerprint_parts([], "org/name", options=ConvertOptions(hf_subset="s", hf_split="v"))
    assert hub[0][0] == "org/name[s:v]"


# --------------------------------------------------------------------------------------
# The console script
# --------------------------------------------------------------------------------------


def test_cli_converts_with_summary(tmp_path: Path) -> None:
    raw, expected = SAMPLES["sharegpt"]
    path = write_jsonl(tmp_path / "chats.jsonl", raw)
    out = tmp_path / "out.jsonl"
    done = run_cli("convert", path, "--out", out)
    assert done.returncode == 0, done.stderr
    assert read_jsonl(out) == expected
    assert done.stdout == ""
    assert "2 records in, 2 out, 0 rejected" in done.stderr
    assert "formats: sharegpt 2" in done.stderr


def test_cli_pretrain_to_stdout(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}])
    done = run_cli("convert", path, "--mode", "pretrain")
    assert done.returncode == 0, done.stderr
    assert read_jsonl_text(done.stdout) == [{"text": "p\n\nr"}]
    assert "1 records in, 1 out" in done.stderr


def test_cli_hf_dataset_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    raw, expected = SAMPLES["text"]
    write_jsonl(folder / "part-0.jsonl", raw)
    out = tmp_path / "out.jsonl"
    done = run_cli("convert", "--hf-dataset", folder, "--streaming", "--out", out)
    assert done.returncode == 0, done.stderr
    assert read_jsonl(out) == expected
