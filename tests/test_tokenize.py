"""`plora tokenize`: shard contents checked against the contract by an independent checker, the
tokenizer identity and fingerprint, and the command's behaviour on good and bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import one_line_error, run_cli
from contract_check import check_rows
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from parallel.errors import InputError, PloraError, Rejects
from parallel.fingerprint import IDENTITY_VERSION, tokenizer_identity
from parallel.layout import IGNORE_INDEX, PackingOptions, parse_record, record_to_json
from parallel.tokenizer import load_tokenizer, special_tokens
from pipeline.convert import ConvertOptions, SourcedRecord, iter_records
from pipeline.shards import open_shards
from pipeline.tokenize import TokenizeJob, pack_records, tokenize_to_shards

LONG = (
    "The old mill by the river ground wheat for two hundred years. Its wheel turned day and night "
    "whenever the water ran high, and the miller's family lived in the rooms above the stones. "
) * 3
OWN_RECORDS: list[dict[str, Any]] = [
    {"text": "Short text."},
    {"text": LONG},
    {
        "messages": [
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Four."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one, and say why you like it?"},
            {"role": "assistant", "content": "Green, because it is the colour of spring leaves."},
        ]
    },
    {
        "main": "Three facts about owls:",
        "branches": ["They hunt at night.", {"prompt": "Q: ears? ", "response": "Asymmetric."}],
    },
    {"text": "Unicode survives: naïve café, 東京, emoji 🙂, tabs\tand\nnewlines."},
    {"main": "", "branches": ["A branch with no trunk.", LONG]},
    {"text": "One more text to fill the last row."},
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name two colours."},
        ],
        "branches": ["Blue.", "Green, like spring leaves."],
    },
    {
        "messages": [{"role": "user", "content": "Here is a passage: the mill ground wheat."}],
        "branches": [{"prompt": "What did it grind?", "response": "Wheat."}, "It is about a mill."],
    },
]

# A template whose assistant turn ends with the EOS '</s>' (as Llama-2's does), for the BOS tokenizer.
BOS_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="session")
def own_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "own.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in OWN_RECORDS), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def bos_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    """A Llama-style tokenizer: adds BOS '<s>' in its default encoding, EOS '</s>'."""
    from transformers import PreTrainedTokenizerFast

    text = (sample_dir / "sample_text.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.split("\n\n"), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = BOS_CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("bos-tokenizer")
    fast.save_pretrained(out)
    return out


def sample_inputs(sample_dir: Path) -> list[Path]:
    return sorted(p for p in sample_dir.glob("sample_*") if p.is_file())


def canonical(inputs: list[Path]) -> list[dict[str, Any]]:
    """The records `tokenize` reads, via `convert` (the checker compares against them)."""
    return [record_to_json(s.record) for s in iter_records(inputs, ConvertOptions(), Rejects())]


def tokenize(inputs: list[Path], tokenizer: Path, out: Path, **options: Any) -> Any:
    extra = {k: options.pop(k) for k in ("rows_per_shard", "num_proc", "chat_template") if k in options}
    job = TokenizeJob(tuple(inputs), tokenizer, out, packing=PackingOptions(**options), **extra)
    tokenize_to_shards(job, Rejects(), progress=False)
    return open_shards(out)


def check(shards: Any, inputs: list[Path], tokenizer_dir: Path) -> int:
    tokenizer = load_tokenizer(tokenizer_dir)
    shards.check_tokenizer(tokenizer)
    rows = [shards.row(i) for i in range(len(shards))]
    trained = check_rows(rows, canonical(inputs), tokenizer, shards.manifest.packing)
    assert trained == shards.manifest.num_trained > 0
    assert sum(r.num_tokens for r in rows) == shards.manifest.num_tokens
    return trained


PACKINGS = {
    "fixed-left": {"branches": 3, "max_seq_len": 24},
    "dynamic-right": {"min_branches": 1, "max_branches": 4, "max_seq_len": 24, "align": "right", "seed": 5},
    "frozen-trunk": {"branches": 2, "max_seq_len": 512, "train_trunk": False},
}


@pytest.mark.parametrize("packing", PACKINGS.values(), ids=PACKINGS.keys())
def test_shards_follow_the_contract(
    packing: dict[str, Any], tiny_model_dir: Path, sample_dir: Path, own_input: Path, tmp_path: Path
) -> None:
    inputs = [own_input, *sample_inputs(sample_dir)]
    shards = tokenize(inputs, tiny_model_dir, tmp_path / "shards", rows_per_shard=7, **packing)
    assert len(shards.manifest.files) > 1
    check(shards, inputs, tiny_model_dir)


@pytest.mark.parametrize("align", ["left", "right"])
def test_bos_tokenizer_starts_sequences_with_bos(
    align: str, bos_tokenizer_dir: Path, own_input: Path, tmp_path: Path
) -> None:
    tokenizer = load_tokenizer(bos_tokenizer_dir)
    assert special_tokens(tokenizer).bos_id == tokenizer.bos_token_id == 0
    shards = tokenize(
        # 64: room for the chat parallel records' trunks in this small vocabulary; LONG is still split
        [own_input],
        bos_tokenizer_dir,
        tmp_path / "shards",
        branches=2,
        max_seq_len=64,
        align=align,
    )
    check(shards, [own_input], bos_tokenizer_dir)
    # BOS starts the trunk, and every branch of a row without one (their start token, docs/layout.md;
    # before issue 7 only the sequences that started at time 0 had it).
    for i in range(len(shards)):
        row = shards.row(i)
        for b in np.unique(row.branch_id):
            seq = row.input_ids[row.branch_id == b]
            has_bos = b == 0 or row.trunk_len == 0
            assert (seq[0] == 0) == has_bos, f"row {i} sequence {b}: BOS starts the trunk or trunkless rows"
            assert np.count_nonzero(seq == 0) == int(has_bos)


def test_alpaca_2k_follows_the_contract(shared_file: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    alpaca = shared_file("alpaca_2k.json")
    shards = tokenize([alpaca], tiny_model_dir, tmp_path / "shards", branches=8, max_seq_len=128)
    records = canonical([alpaca])
    assert len(records) == 2000 and all("messages" in r for r in records)
    check(shards, [alpaca], tiny_model_dir)


def test_checker_catches_broken_rows(tiny_model_dir: Path, own_input: Path, tmp_path: Path) -> None:
    shards = tokenize([own_input], tiny_model_dir, tmp_path / "shards", branches=2, max_seq_len=24)
    tokenizer = load_tokenizer(tiny_model_dir)
    packing, records = shards.manifest.packing, canonical([own_input])
    rows = [shards.row(i) for i in range(len(shards))]
    check_rows(rows, records, tokenizer, packing)

    untrained = rows[0].labels.copy()
    untrained[untrained != IGNORE_INDEX] = IGNORE_INDEX
    broken = [*rows]
    broken[0] = type(rows[0])(rows[0].input_ids, rows[0].branch_id, rows[0].time_id, untrained, 2, 0)
    with pytest.raises(AssertionError):
        check_rows(broken, records, tokenizer, packing)
    with pytest.raises(AssertionError, match="no row|missing|differ|belong"):
        check_rows(rows[:-1], records, tokenizer, packing)


def test_pack_records_matches_the_shards(tiny_model_dir: Path, own_input: Path, tmp_path: Path) -> None:
    options = {"branches": 3, "max_seq_len": 24}
    shards = tokenize([own_input], tiny_model_dir, tmp_path / "shards", **options)
    records = iter_records([own_input], ConvertOptions(), Rejects())
    rows = list(pack_records(records, load_tokenizer(tiny_model_dir), PackingOptions(**options), Rejects()))
    assert len(rows) == len(shards)
    for i, row in enumerate(rows):
        for name in ("input_ids", "branch_id", "time_id", "labels"):
            assert np.array_equal(getattr(row, name), getattr(shards.row(i), name))


def test_chat_eos_is_added_only_when_the_template_lacks_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    chat = SourcedRecord(
        parse_record(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
        ),
        "mem",
        1,
    )
    tokenizer = load_tokenizer(tiny_model_dir)
    eos = tokenizer.eos_token_id
    (row,) = pack_records([chat], tokenizer, PackingOptions(branches=1), Rejects())
    assert row.input_ids[0] == eos  # the branch's start token (no BOS, no trunk: EOS)
    # ChatML closes both turns with <|im_end|>: no extra
    assert np.count_nonzero(row.input_ids[1:] == eos) == 2
    template = tmp_path / "no_eos.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    (row,) = pack_records(
        [chat], load_tokenizer(tiny_model_dir, template), PackingOptions(branches=1), Rejects()
    )
    assert row.input_ids[-1] == eos and row.labels[-2] == eos
    assert np.count_nonzero(row.input_ids[1:] == eos) == 1


def test_template_that_is_not_prefix_stable_is_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Renders only the last assistant message's content in full: earlier turns change as the chat grows.
    template = tmp_path / "unstable.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: "
        "{% if loop.last %}{{ m['content'] }}{% else %}{{ m['content'][:2] }}{% endif %}\n{% endfor %}"
    )
    chat = {
        "messages": [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you"},
        ]
    }
    record = SourcedRecord(parse_record(chat), "chats.jsonl", 4)
    tokenizer = load_tokenizer(tiny_model_dir, template)
    with pytest.raises(InputError, match=r"chats.jsonl:4: .*not prefix-stable"):
        list(pack_records([record], tokenizer, PackingOptions(), Rejects()))
    skip = Rejects("skip")
    assert list(pack_records([record], tokenizer, PackingOptions(), skip)) == []
    assert skip.total == 1


def test_tokenizer_identity_follows_the_tokenizer(
    tiny_model_dir: Path, bos_tokenizer_dir: Path, tmp_path: Path
) -> None:
    tiny = tokenizer_identity(load_tokenizer(tiny_model_dir))
    assert tiny == tokenizer_identity(load_tokenizer(tiny_model_dir))
    assert tiny["vocab_size"] == len(load_tokenizer(tiny_model_dir))
    assert tiny["version"] == IDENTITY_VERSION
    bos = tokenizer_identity(load_tokenizer(bos_tokenizer_dir))
    assert tiny["vocab_sha256"] != bos["vocab_sha256"] and tiny["sha256"] != bos["sha256"]
    # Another chat template: the same ids (vocab_sha256), another rendering of chats (sha256).
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    templated = tokenizer_identity(load_tokenizer(tiny_model_dir, template))
    assert tiny["vocab_sha256"] == templated["vocab_sha256"] and tiny["sha256"] != templated["sha256"]


@pytest.mark.slow
def test_num_proc_gives_the_same_shards(
    tiny_model_dir: Path, sample_dir: Path, own_input: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.tokenize

    monkeypatch.setattr(pipeline.tokenize, "ENCODE_BATCH", 16)  # several batches in flight at once
    inputs = [own_input, *sample_inputs(sample_dir)]
    options = {"min_branches": 2, "max_branches": 5, "max_seq_len": 32, "rows_per_shard": 5}
    one = tokenize(inputs, tiny_model_dir, tmp_path / "one", **options)
    two = tokenize(inputs, tiny_model_dir, tmp_path / "two", num_proc=2, **options)
    assert one.manifest == two.manifest
    for entry in one.manifest.files:
        assert (tmp_path / "one" / entry.name).read_bytes() == (tmp_path / "two" / entry.name).read_bytes()


# --------------------------------------------------------------------------------------
# The command line (real subprocesses of the installed script)
# --------------------------------------------------------------------------------------


def test_cli_aliases_and_changed_options(tiny_model_dir: Path, own_input: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    args = [own_input, "--tokenizer", tiny_model_dir, "--out", out]
    first = run_cli("tokenize", *args, "--branches_per_sample", 3, "--max_seq_len", 32)
    assert first.returncode == 0, first.stderr
    assert "records in" in first.stderr and "tokens/s" in first.stderr
    packing = open_shards(out).manifest.packing
    assert (packing["branches"], packing["max_seq_len"]) == (3, 32)
    other = one_line_error(run_cli("tokenize", *args, "--max_branches_per_sample", 4))
    assert "options" in other and "--overwrite" in other


def test_up_to_date_is_a_no_op_and_overwrite_replaces(
    tiny_model_dir: Path, own_input: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    tokenize([own_input], tiny_model_dir, out, branches=3)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    job = TokenizeJob((own_input,), tiny_model_dir, out, packing=PackingOptions(branches=3))
    assert tokenize_to_shards(job, Rejects(), progress=False).up_to_date
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before

    changed = TokenizeJob((own_input,), tiny_model_dir, out, packing=PackingOptions(branches=2))
    with pytest.raises(PloraError, match="other options; pass --overwrite"):
        tokenize_to_shards(changed, Rejects(), progress=False)
    other_input = tmp_path / "other.jsonl"
    other_input.write_text('{"text": "x"}\n')
    with pytest.raises(PloraError, match="other inputs; pass --overwrite"):
        tokenize_to_shards(replace(job, inputs=(other_input,)), Rejects(), progress=False)
    overwrite = TokenizeJob(
        (own_input,), tiny_model_dir, out, packing=PackingOptions(branches=2), overwrite=True
    )
    summary = tokenize_to_shards(overwrite, Rejects(), progress=False)
    assert not summary.up_to_date and open_shards(out).manifest.packing["branches"] == 2


def test_cli_tokenizer_without_chat_template(tiny_model_dir: Path, own_input: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare-tokenizer"
    load_tokenizer(tiny_model_dir).save_pretrained(bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (bare / name).unlink(missing_ok=True)
    assert load_tokenizer(bare).chat_template is None

    args = [own_input, "--tokenizer", bare, "--out", tmp_path / "shards"]
    error = one_line_error(run_cli("tokenize", *args))
    assert f"{own_input}:3:" in error and "no chat template" in error and "--chat-template" in error

    template = tmp_path / "chatml.jinja"
    template.write_text(load_tokenizer(tiny_model_dir).chat_template)
    shards = tokenize([own_input], bare, tmp_path / "shards", chat_template=template)
    check(shards, [own_input], tiny_model_dir)  # the same tokens as with the template built in


def test_cli_bad_tokenizer_and_out(tiny_model_dir: Path, own_input: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    error = one_line_error(run_cli("tokenize", own_input, "--tokenizer", missing, "--out", tmp_path / "o"))
    assert str(missing) in error and "tokenizer" in error
    assert not (tmp_path / "o").exists()
    # A missing input is named first, before the tokenizer is loaded (here it is missing as well).
    no_input = tmp_path / "no-such-input.jsonl"
    error = one_line_error(run_cli("tokenize", no_input, "--tokenizer", missing, "--out", tmp_path / "o"))
    assert error == f"plora: error: {no_input}: no such file"
    assert not (tmp_path / "o").exists()

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "shards"
    error = one_line_error(run_cli("tokenize", own_input, "--tokenizer", tiny_model_dir, "--out", out))
    assert str(out) in error and "cannot write" in error


def test_bad_record_is_named_or_skipped(tiny_model_dir: Path, own_input: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(own_input.read_text() + '{"branches": []}\n')
    job = TokenizeJob((bad,), tiny_model_dir, tmp_path / "raise")
    with pytest.raises(PloraError, match=rf"{bad}:{len(OWN_RECORDS) + 1}: "):
        tokenize_to_shards(job, Rejects(), progress=False)
    rejects_file = tmp_path / "rejects.jsonl"
    skip = Rejects("skip", rejects_file)
    summary = tokenize_to_shards(TokenizeJob((bad,), tiny_model_dir, tmp_path / "skip"), skip, progress=False)
    skip.close()
    assert summary.records_rejected == 1 and summary.records_out == len(OWN_RECORDS)
    assert len(rejects_file.read_text().splitlines()) == 1
    check(open_shards(tmp_path / "skip"), [own_input], tiny_model_dir)


def test_empty_input_is_an_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PloraError, match="nothing to tokenize"):
        tokenize_to_shards(TokenizeJob((empty,), tiny_model_dir, tmp_path / "out"), Rejects(), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_progress_reports_records_rows_and_rate(
    tiny_model_dir: Path, own_input: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = TokenizeJob((own_input,), tiny_model_dir, tmp_path / "out", packing=PackingOptions(branches=2))
    summary = tokenize_to_shards(job, Rejects(), progress=True)
    err = capsys.readouterr().err
    assert f"{len(OWN_RECORDS)} records" in err and "tok/s" in err
    assert summary.records_out == len(OWN_RECORDS) and summary.rows == len(open_shards(tmp_path / "out"))


# Like Qwen3's template: an assistant turn after the last user message shows its reasoning in a
# <think> block (an empty one when it is the chat's last message); earlier turns lose the reasoning.
# So rendering a prefix of a chat is not a prefix of the chat's rendering.
QWEN3_LIKE_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- set content = m['content'] %}"
    "{%- if m['role'] == 'assistant' %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' "
    "+ content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_template_that_drops_earlier_reasoning_trains_assistant_contents(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    template = tmp_path / "qwen3_like.jinja"
    template.write_text(QWEN3_LIKE_TEMPLATE)
    tokenizer = load_tokenizer(tiny_model_dir, template)
    chats = [r for r in OWN_RECORDS if "messages" in r] + [
        {
            "messages": [
                {"role": "user", "content": "Two plus two?"},
                {"role": "assistant", "content": "Four."},
                {"role": "user", "content": "And three plus three?"},
                {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\nSix."},
            ]
        }
    ]
    rendered = tokenizer.apply_chat_template(chats[1]["messages"], tokenize=False)
    prefix = tokenizer.apply_chat_template(chats[1]["messages"][:3], tokenize=False)
    assert not rendered.startswith(prefix)  # the case the prefix method cannot handle
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    shards = tokenize([path], tiny_model_dir, tmp_path / "shards", branches=2, chat_template=template)
    rows = [shards.row(i) for i in range(len(shards))]
    assert check_rows(rows, chats, tokenizer, shards.manifest.packing) == shards.manifest.num_trained

    (row,) = pack_records(
        [SourcedRecord(parse_record(chats[1]), "mem", 1)], tokenizer, PackingOptions(branches=1), Rejects()
    )
    trained = row.input_ids[1:][row.labels[:-1] != IGNORE_INDEX]
    want = "Blue.<|im_end|>Green, because it is the colour of spring leaves.<|im_end|>"
    assert tokenizer.decode(trained) == want

    # Reasoning in an earlier turn is not rendered, so that turn cannot be located: rejected, named.
    dropped = {"messages": chats[-1]["messages"] + [{"role": "user", "content": "Thanks"}]}
    dropped["messages"].append({"role": "assistant", "content": "You are welcome."})
    record = SourcedRecord(parse_record(dropped), "chats.jsonl", 7)
    with pytest.raises(InputError, match=r"chats.jsonl:7: .*assistant message 3's content"):
        list(pack_records([record], tokenizer, PackingOptions(), Rejects()))


def test_cli_skip_mode_reuses_its_output_directory(
    tiny_model_dir: Path, own_input: Path, tmp_path: Path
) -> None:
    """--on-error skip takes --out as the shard directory it is, also when it exists (rerun, --resume)."""
    out = tmp_path / "shards"
    args = (own_input, "--tokenizer", tiny_model_dir, "--out", out, "--on-error", "skip")
    first = run_cli("tokenize", *args)
    assert first.returncode == 0, first.stderr
    again = run_cli("tokenize", *args)
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stderr
