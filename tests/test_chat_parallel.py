"""Issue 7 item 2: chat parallel records {"messages", "branches"}, their trunk shared with
`plora generate --chat`, and the separator of plain {prompt, response} branches; item 7's bad
input "a chat parallel record whose messages end with an assistant turn"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import one_line_error, run_cli

from parallel.decoder import _plan
from parallel.errors import Rejects
from parallel.generation import encode_prompt
from parallel.layout import PackedRow, PackingOptions, parse_record, record_to_json
from parallel.tokenizer import load_tokenizer, special_tokens
from pipeline.convert import SourcedRecord
from pipeline.tokenize import pack_records

# SmolLM2-135M-Instruct's template: a default system prompt when the chat has none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
PROMPT = "List two ways to save energy at home."


@pytest.fixture(scope="module", params=["chatml", "default-system"])
def chat_tokenizer_dir(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny model's ChatML tokenizer, and a copy whose template injects a default system prompt."""
    if request.param == "chatml":
        return tiny_model_dir
    out = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("smol-template") / "model"))
    (out / "chat_template.jinja").write_text(DEFAULT_SYSTEM_TEMPLATE, encoding="utf-8")
    return out


def pack(record: dict[str, Any], tokenizer: Any) -> PackedRow:
    item = SourcedRecord(parse_record(record), "mem", 1)
    (row,) = pack_records([item], tokenizer, PackingOptions(branches=1), Rejects())
    return row


def sequences(row: PackedRow) -> list[list[int]]:
    """Each sequence's ids in time order (rows are stored branch-contiguous, in time order)."""
    return [row.input_ids[row.branch_id == b].tolist() for b in range(int(row.branch_id.max()) + 1)]


@pytest.mark.parametrize("lead", ["", "Two ways:\n"])
def test_item2_generate_chat_trunk_is_the_tokenized_trunk(chat_tokenizer_dir: Path, lead: str) -> None:
    tokenizer = load_tokenizer(chat_tokenizer_dir)
    record = {"messages": [{"role": "user", "content": PROMPT}], "lead": lead, "branches": ["A.", "B."]}
    row = pack(record, tokenizer)
    trunk, *branches = sequences(row)
    assert {b[0] for b in branches} == {branches[0][0]}  # every branch starts with the trunk's last token
    generated_trunk = encode_prompt(tokenizer, PROMPT, chat=True, lead=lead)
    assert generated_trunk == trunk + [branches[0][0]]
    if chat_tokenizer_dir.name == "model":
        assert "You are a helpful AI assistant" in tokenizer.decode(trunk)
    # ... and generation's prefill lays out that trunk and those starts exactly as the row does.
    plan = _plan(generated_trunk, [[], []], special_tokens(tokenizer), "isolated", "left", None)
    at_start = (row.branch_id == 0) | (row.time_id == row.trunk_len)
    assert plan.prefill_ids.tolist() == row.input_ids[at_start].tolist()
    assert plan.prefill_branch.tolist() == row.branch_id[at_start].tolist()
    assert plan.prefill_time.tolist() == row.time_id[at_start].tolist()


def test_item2_chat_parallel_branches_decode_to_the_template_render(chat_tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(chat_tokenizer_dir)
    messages = [{"role": "user", "content": "Here is a passage: the mill ground wheat."}]
    answer, question, response = "It is about a mill.", "What did it grind?", "Wheat."
    for branch, turns in [
        (answer, [{"role": "assistant", "content": answer}]),
        (
            {"prompt": question, "response": response},
            [{"role": "user", "content": question}, {"role": "assistant", "content": response}],
        ),
    ]:
        row = pack({"messages": messages, "branches": [branch]}, tokenizer)
        trunk, content = sequences(row)
        want = tokenizer.apply_chat_template(messages + turns, tokenize=False).rstrip()
        assert tokenizer.decode(trunk + content) == want
        # Trained: the answer and its end of turn (the labels of the branch's tokens), nothing before.
        labels = row.labels[row.branch_id == 1]
        trained = [int(t) for t in labels if t >= 0]
        assert tokenizer.decode(trained) == turns[-1]["content"] + tokenizer.eos_token
        assert np.all(row.labels[row.branch_id == 0] < 0)  # system and user turns: not trained


def test_item2_plain_prompt_response_branch_has_a_newline_separator(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    record = {"main": "Two questions:", "branches": [{"prompt": "How many?", "response": "Four."}]}
    _, branch = sequences(pack(record, tokenizer))
    assert tokenizer.decode(branch[1:]) == "How many?\nFour." + tokenizer.eos_token


CHAT_PARALLEL = {
    "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROMPT}],
    "branches": ["Turn off lights.", {"prompt": "And in winter?", "response": "Seal the windows."}],
}


def test_item2_convert_tokenize_inspect_and_eval_accept_chat_parallel_records(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(CHAT_PARALLEL) + "\n", encoding="utf-8")
    records = tmp_path / "records.jsonl"
    done = run_cli("convert", source, "--out", records)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in records.read_text().splitlines()] == [CHAT_PARALLEL]
    assert record_to_json(parse_record(CHAT_PARALLEL)) == CHAT_PARALLEL

    shards = tmp_path / "shards"
    done = run_cli("tokenize", records, "--tokenizer", tiny_model_dir, "--out", shards)
    assert done.returncode == 0, done.stderr
    done = run_cli("inspect", shards, "--row", 0, "--json")
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)["row"]
    assert row["has_trunk"] and row["num_branches"] == 2
    assert "Seal the windows." in row["sequences"][2]["text"]
    done = run_cli("eval", "--shards", shards, "--base-model", tiny_model_dir, "--json")
    assert done.returncode == 0, done.stderr
    assert "loss" in done.stdout


def test_item7_chat_parallel_ending_with_assistant_is_one_line_error_or_counted(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
           "branches": ["a", "b"]}  # fmt: skip
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(CHAT_PARALLEL) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    args = ["tokenize", records, "--tokenizer", tiny_model_dir]
    error = one_line_error(run_cli(*args, "--out", tmp_path / "raise"))
    assert f"{records}:2" in error and "end with an assistant turn" in error, error
    error = one_line_error(run_cli("convert", records))
    assert f"{records}:2" in error and "end with an assistant turn" in error, error

    out = tmp_path / "skip"
    done = run_cli(*args, "--out", out, "--on-error", "skip")
    assert done.returncode == 0, done.stderr
    assert "2 records in, 1 out, 1 rejected" in done.stderr
    (entry,) = [json.loads(line) for line in Path(f"{out}.rejects.jsonl").read_text().splitlines()]
    assert entry["line"] == 2 and "end with an assistant turn" in entry["reason"]


def test_lead_starts_the_answer_in_the_trunk_and_is_trained(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    lead = "Two ways:\n"
    record = {
        "messages": [{"role": "user", "content": PROMPT}],
        "lead": lead,
        "branches": ["1. Insulate the loft.\n", "2. Switch lights off."],
    }
    row = pack(record, tokenizer)
    trunk, *branches = sequences(row)
    start = branches[0][0]
    assert {b[0] for b in branches} == {start}  # the lead's last token starts every branch
    prompt_text = tokenizer.decode(encode_prompt(tokenizer, PROMPT, chat=True))
    assert tokenizer.decode(trunk + [start]) == prompt_text + lead
    trunk_labels = row.labels[row.branch_id == 0]
    # The lead is the assistant's text: every lead token in the trunk is a training target ...
    assert tokenizer.decode(trunk_labels[trunk_labels >= 0].tolist() + [start]) == lead
    # ... and the rendered user turn is not.
    lead_tokens = len(tokenizer(lead, add_special_tokens=False)["input_ids"])
    assert len(trunk_labels[trunk_labels >= 0]) == lead_tokens - 1


def test_lead_needs_string_branches() -> None:
    record = {
        "messages": [{"role": "user", "content": PROMPT}],
        "lead": "Two ways:\n",
        "branches": [{"prompt": "Why?", "response": "Because."}],
    }
    with pytest.raises(ValueError, match="every branch must be a string"):
        parse_record(record)


def test_split_lists_records_keep_their_lead_through_convert_and_tokenize(
    tiny_model_dir: Path, sample_dir: Path, tmp_path: Path
) -> None:
    answer = "Three of them:\n1. Walk.\n2. Cycle.\n3. Take the train."
    chat = [{"role": "user", "content": "Ways to get to work?"}, {"role": "assistant", "content": answer}]
    led = tmp_path / "led.jsonl"
    led.write_text(json.dumps({"messages": chat}) + "\n")
    records, again = tmp_path / "lists.jsonl", tmp_path / "again.jsonl"
    done = run_cli("convert", led, "--split-lists", "--out", records)
    assert done.returncode == 0, done.stderr
    [record] = [json.loads(line) for line in records.read_text().splitlines()]
    assert record["lead"] == "Three of them:\n" and len(record["branches"]) == 3
    done = run_cli("convert", records, "--out", again)  # canonical records pass through whole
    assert done.returncode == 0, done.stderr
    assert json.loads(again.read_text()) == record

    shards = tmp_path / "shards"
    done = run_cli("tokenize", records, "--tokenizer", tiny_model_dir, "--out", shards)
    assert done.returncode == 0, done.stderr
    done = run_cli("inspect", shards, "--row", 0, "--json")
    assert done.returncode == 0, done.stderr
    trunk, *branches = json.loads(done.stdout)["row"]["sequences"]
    # The lead ends the trunk; its last token (":\n" for this tokenizer) is every branch's start.
    assert trunk["text"].endswith("<|im_start|>assistant\nThree of them")
    assert all(b["text"].startswith(":\n") for b in branches)
    assert "1. Walk." in branches[0]["text"]

    # The sample Alpaca lists tokenize whole.
    alpaca = tmp_path / "alpaca.jsonl"
    lists = sample_dir / "sample_alpaca.json"
    done = run_cli("convert", lists, "--split-lists", "--out", alpaca)
    assert done.returncode == 0, done.stderr
    done = run_cli("tokenize", alpaca, "--tokenizer", tiny_model_dir, "--out", tmp_path / "s2")
    assert done.returncode == 0, done.stderr
    assert "0 rejected" in done.stderr + done.stdout


def test_a_lead_with_a_prompt_response_branch_is_one_line(tmp_path: Path) -> None:
    record = {
        "messages": [{"role": "user", "content": PROMPT}],
        "lead": "Two ways:\n",
        "branches": [{"prompt": "Why?", "response": "Because."}],
    }
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps(record) + "\n")
    line = one_line_error(run_cli("convert", source))
    assert f"{source}:1" in line and "every branch must be a string" in line
