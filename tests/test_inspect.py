"""`plora inspect`: facts against independent computations, the picture against the facts, the CLI."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from cli_helpers import one_line_error, run_cli
from packing import pack_rows
from PIL import Image

from parallel.errors import PloraError
from parallel.layout import (
    IGNORE_INDEX,
    MASK_MODES,
    PackedRow,
    PackingOptions,
    PackItem,
    SpecialTokens,
    TokenSequence,
    build_row,
)
from pipeline.draw import MAX_MASK_PIXELS, PNG_FACTS_KEY, check_png_target, row_figure, write_row_png
from pipeline.inspect import (
    Decode,
    RowView,
    padding_waste,
    row_facts,
    row_view,
    rows_metadata,
    token_texts,
    totals_facts,
    visibility,
    visible_pairs,
)

EOS = 1
SPECIAL = SpecialTokens(eos_id=EOS)


def seq(n: int, start: int, trained: bool | list[bool] = True) -> TokenSequence:
    ids = list(range(start, start + n - 1)) + [EOS]
    return TokenSequence.of(ids, trained)


def parallel_row(align: str = "left") -> PackedRow:
    trunk = seq(4, 10, trained=False)
    branches = [seq(3, 20), seq(5, 30, trained=[False, False, True, True, True]), seq(2, 40)]
    return build_row(trunk, branches, align, SPECIAL)


def text_rows() -> list[PackedRow]:
    rng = np.random.default_rng(7)
    lengths = rng.integers(2, 30, size=23)
    items = [PackItem(pieces=(seq(int(n), 100 + 10 * i),)) for i, n in enumerate(lengths)]
    options = PackingOptions(min_branches=1, max_branches=4, max_seq_len=16, seed=3)
    return list(pack_rows(items, options, SPECIAL))


def decode(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


# --------------------------------------------------------------------------------------
# Totals
# --------------------------------------------------------------------------------------


def naive_waste(lengths: list[int], batch: int) -> float:
    padded = pad = 0
    for start in range(0, len(lengths), batch):
        chunk = lengths[start : start + batch]
        for n in chunk:
            pad += max(chunk) - n
            padded += max(chunk)
    return pad / padded


def test_totals_agree_with_the_rows_counted_directly() -> None:
    rows = text_rows() + [parallel_row()]
    totals = totals_facts(rows_metadata(rows), batch_size=3)

    lengths = [len(r.input_ids) for r in rows]
    trained = sum(int((r.labels != IGNORE_INDEX).sum()) for r in rows)
    assert totals["rows"] == len(rows)
    assert totals["tokens"] == sum(lengths)
    assert totals["trained_tokens"] == trained
    assert totals["trained_fraction"] == pytest.approx(trained / sum(lengths))
    assert totals["rows_with_trunk"] == 1
    histogram = Counter(len(set(r.branch_id.tolist())) - (1 if r.trunk_len else 0) for r in rows)
    assert totals["branches_histogram"] == {str(k): v for k, v in sorted(histogram.items())}
    per_row = totals["tokens_per_row"]
    assert per_row == {"min": min(lengths), "mean": pytest.approx(np.mean(lengths)), "max": max(lengths)}
    waste = totals["padding_waste"]
    assert waste["batch_size"] == 3
    assert waste["stored_order"] == pytest.approx(naive_waste(lengths, 3))
    assert waste["grouped_by_length"] == pytest.approx(naive_waste(sorted(lengths), 3))
    assert waste["grouped_by_length"] <= waste["stored_order"]


def test_padding_waste_edges() -> None:
    assert padding_waste([5, 5, 5], 2) == 0.0
    assert padding_waste([], 8) == 0.0
    assert padding_waste([1, 3], 2) == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        padding_waste([1], 0)


# --------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------


def spec_visible(mode: str, bq: int, tq: int, bk: int, tk: int, same: bool, trunk: bool) -> bool:
    """docs/layout.md's attention rules, written out token by token."""
    if mode == "isolated":
        return tk <= tq and (bk == bq or (trunk and bk == 0))
    return tk < tq or same


def spec_pairs(mode: str, branch_id: np.ndarray, time_id: np.ndarray, trunk: bool) -> int:
    b, t, n = branch_id.tolist(), time_id.tolist(), len(branch_id)
    return sum(spec_visible(mode, b[q], t[q], b[k], t[k], q == k, trunk) for q in range(n) for k in range(n))


@pytest.mark.parametrize("align", ["left", "right"])
def test_row_facts_follow_the_layout(align: str) -> None:
    row = parallel_row(align)
    facts = row_facts(row, 5, decode)

    assert facts["index"] == 5
    # The trunk's last token (here its EOS) moves into every branch as its start (docs/layout.md).
    assert facts["tokens"] == 3 + 4 + 6 + 3
    assert facts["trained_tokens"] == int((row.labels != IGNORE_INDEX).sum())
    assert facts["has_trunk"] and facts["trunk_len"] == 3 and facts["num_branches"] == 3
    sequences = facts["sequences"]
    assert [s["role"] for s in sequences] == ["trunk", "branch", "branch", "branch"]
    assert [s["tokens"] for s in sequences] == [3, 4, 6, 3]
    assert (sequences[0]["time_start"], sequences[0]["time_end"]) == (0, 2)
    starts = [3, 3, 3] if align == "left" else [3 + 6 - 4, 3, 3 + 6 - 3]
    assert [s["time_start"] for s in sequences[1:]] == starts
    assert [s["time_end"] - s["time_start"] + 1 for s in sequences] == [3, 4, 6, 3]
    # trained targets: every token after the start of a fully trained branch, tokens 2..4 of the
    # prompt/response one
    assert [s["trained_tokens"] for s in sequences] == [0, 3, 3, 2]
    assert sequences[2]["ids"] == [EOS, 30, 31, 32, 33, EOS]
    assert sequences[2]["text"] == "w1 w30 w31 w32 w33 w1"
    assert facts["time_span"] == 3 + 6


@pytest.mark.parametrize("row", [parallel_row("left"), parallel_row("right"), text_rows()[0]], ids=str)
def test_mask_facts_match_the_spec_rules(row: PackedRow) -> None:
    facts = row_facts(row, 0)
    n = len(row.input_ids)
    for mode in MASK_MODES:
        pairs = spec_pairs(mode, row.branch_id, row.time_id, row.trunk_len > 0)
        m = facts["masks"][mode]
        assert m["visible_pairs"] == pairs
        assert m["density"] == pytest.approx(pairs / n**2)
        assert m["dense_float32_bytes"] == np.zeros((n, n), np.float32).nbytes
        assert m["dense_bool_bytes"] == np.zeros((n, n), bool).nbytes


def test_targets_are_the_trained_tokens_after_each_sequence_start() -> None:
    view = row_view(parallel_row("right"))
    # trunk untrained; each branch starts with the start token, then: branch 1 all trained; branch 2
    # trains its last 3; branch 3 all trained
    expected = [False] * 3 + [False, True, True, True] + [False, False, False, True, True, True]
    expected += [False, True, True]
    assert view.target.tolist() == expected


def test_masks_in_blocks_and_subsets_agree_with_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    view = row_view(parallel_row("right"))
    picked = np.array([0, 3, 4, 9, 13])
    for mode in MASK_MODES:
        whole = visibility(view, mode)
        part = visibility(view, mode, queries=picked, keys=picked)
        assert np.array_equal(part, whole[np.ix_(picked, picked)])
        monkeypatch.setattr("pipeline.inspect.MASK_BLOCK_ELEMENTS", 3 * view.num_tokens)  # 3 queries a block
        assert visible_pairs(view, mode) == int(whole.sum())


def test_facts_do_not_depend_on_the_stored_order() -> None:
    row = parallel_row("right")
    perm = np.random.default_rng(0).permutation(len(row.input_ids))
    columns = (row.input_ids[perm], row.branch_id[perm], row.time_id[perm], row.labels[perm])
    shuffled = PackedRow(*columns, num_branches=row.num_branches, trunk_len=row.trunk_len)
    assert row_facts(shuffled, 0, decode) == row_facts(row, 0, decode)


@pytest.mark.parametrize("branches", [1, 3])
def test_row_without_trunk_has_no_trunk_role(branches: int) -> None:
    row = build_row(None, [seq(3, 10 * i) for i in range(2, 2 + branches)], "left", SPECIAL)
    facts = row_facts(row, 0)
    assert not facts["has_trunk"]
    assert [s["role"] for s in facts["sequences"]] == ["branch"] * branches
    assert all(s["text"] is None for s in facts["sequences"])
    assert token_texts(row_view(row), None) == [str(i) for i in row.input_ids.tolist()]


# --------------------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------------------


def draw_inputs(row: PackedRow, decoder: Decode = decode) -> tuple[dict, RowView, list[str]]:
    view = row_view(row)
    return {"row": row_facts(row, 0, decoder)}, view, token_texts(view, decoder)


def test_png_is_a_picture_that_carries_the_facts(tmp_path) -> None:
    facts, view, tokens = draw_inputs(parallel_row("right"))
    path = write_row_png(tmp_path / "row.png", facts, view, tokens, title="test row")

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < path.stat().st_size < 5_000_000
    with Image.open(path) as image:
        assert image.width >= 1000 and image.height >= 700
        assert json.loads(image.text[PNG_FACTS_KEY]) == facts["row"]
    assert [p.name for p in tmp_path.iterdir()] == ["row.png"]  # no temporary left behind


def test_numbers_drawn_are_the_facts() -> None:
    facts, view, tokens = draw_inputs(parallel_row())
    fig = row_figure(facts, view, tokens, title="t")
    titles = [fig.get_suptitle()] + [ax.get_title() for ax in fig.axes]
    texts = "\n".join(titles + [t.get_text() for ax in fig.axes for t in ax.texts])
    row = facts["row"]
    for mode in MASK_MODES:
        m = row["masks"][mode]
        assert f"{mode} mask" in texts
        assert f"{m['visible_pairs']:,} visible pairs" in texts
        assert f"density {m['density']:.1%}" in texts
    assert f"{row['tokens']:,} tokens ({row['trained_tokens']:,} trained)" in texts
    assert "trunk of 3 tokens + 3 branches" in texts
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert legend == ["trunk", "branch 1", "branch 2", "branch 3", "not visible"]
    # every token has its cell text; w-prefixed decodes are shorter than the cells
    assert sum(len(ax.texts) for ax in fig.axes) == row["tokens"]


def test_png_under_a_file_is_a_one_line_error(tmp_path) -> None:
    # issue 10 item 21 changed this: a missing directory is made, a file in the way is refused
    (tmp_path / "a-file").write_text("")
    facts, view, tokens = draw_inputs(parallel_row())
    with pytest.raises(PloraError, match="cannot write PNG"):
        write_row_png(tmp_path / "a-file" / "row.png", facts, view, tokens, title="t")
    with pytest.raises(PloraError, match="a-file is not a directory"):
        check_png_target(tmp_path / "a-file" / "no" / "row.png")


def test_long_row_is_drawn_from_a_sample_of_its_mask() -> None:
    row = build_row(None, [seq(700, 10), seq(650, 800)], "left", SPECIAL)
    facts, view, tokens = draw_inputs(row)
    fig = row_figure(facts, view, tokens, title="long")
    for ax in fig.axes[:2]:
        image = ax.images[0].get_array()
        assert image.shape[:2] == (MAX_MASK_PIXELS, MAX_MASK_PIXELS) and image.dtype == np.uint8
    # no room for token text at 700 time steps: the grid says so instead of drawing unreadable text
    assert "too many time steps" in fig.axes[2].get_title() and not fig.axes[2].texts


def test_tokens_the_font_cannot_draw_show_their_id() -> None:
    row = build_row(None, [seq(3, 20)], "left", SPECIAL)
    facts, view, tokens = draw_inputs(row, lambda ids: "中文" if ids == [21] else "ok")
    fig = row_figure(facts, view, tokens, title="t")
    assert sorted(t.get_text() for t in fig.axes[2].texts) == ["#21", "ok", "ok", "ok"]  # with the start


# --------------------------------------------------------------------------------------
# The command, on shards built by the real `plora tokenize`
# --------------------------------------------------------------------------------------

RECORDS = [
    {"text": "The river ran past the mill, and the mill wheel turned all day long without rest."},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    {"main": "Two ways to greet:", "branches": [{"prompt": "Formal:", "response": "Good day."}, "Hey!"]},
    {"text": "Short one."},
    {"text": "Bread rises because yeast makes gas while the dough rests in a warm place."},
]
PACKING_FLAGS = ["--branches", "2", "--max-seq-len", "12", "--align", "right"]


@pytest.fixture(scope="module")
def records_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inspect") / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shard_dir(tiny_model_dir: Path, records_file: Path) -> Path:
    out = records_file.parent / "shards"
    args = ["tokenize", records_file, "--tokenizer", tiny_model_dir, "--out", out, *PACKING_FLAGS]
    result = run_cli(*args, "--rows-per-shard", "2")
    assert result.returncode == 0, result.stderr
    return out


def read_rows(directory: Path) -> list[dict[str, np.ndarray]]:
    """Every row's columns, read with pyarrow alone (not through pipeline.shards)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    rows = []
    for entry in manifest["files"]:
        table = pa.ipc.open_file(pa.memory_map(str(directory / entry["name"]))).read_all()
        for record in table.to_pylist():
            rows.append({k: np.asarray(v) if isinstance(v, list) else v for k, v in record.items()})
    return rows


def trunk_row_index(directory: Path) -> int:
    trunk_rows = [i for i, r in enumerate(read_rows(directory)) if r["trunk_len"] > 0]
    assert len(trunk_rows) == 1  # the one parallel record
    return trunk_rows[0]


@pytest.fixture(scope="module")
def shown(shard_dir: Path) -> dict:
    """`plora inspect --json --png` of the row that holds the parallel record."""
    png = shard_dir.parent / "row.png"
    index = trunk_row_index(shard_dir)
    result = run_cli("inspect", shard_dir, "--row", index, "--json", "--png", png, "--batch-size", 2)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # stdout is exactly one JSON document


def test_cli_json_and_png_agree_with_the_shards(tiny_model_dir: Path, shard_dir: Path, shown: dict) -> None:
    from transformers import AutoTokenizer

    rows = read_rows(shard_dir)
    lengths = [len(r["input_ids"]) for r in rows]
    totals = shown["totals"]
    assert totals["rows"] == len(rows)
    assert totals["tokens"] == sum(lengths)
    assert totals["trained_tokens"] == sum(int((r["labels"] != IGNORE_INDEX).sum()) for r in rows)
    distinct = Counter(len(set(r["branch_id"].tolist())) - (r["trunk_len"] > 0) for r in rows)
    assert totals["branches_histogram"] == {str(k): n for k, n in sorted(distinct.items())}
    assert totals["padding_waste"]["stored_order"] == pytest.approx(naive_waste(lengths, 2))
    assert shown["source"]["verified"] and shown["manifest"]["packing"]["align"] == "right"

    index = trunk_row_index(shard_dir)
    row = rows[index]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    facts = shown["row"]
    assert facts["index"] == index and facts["has_trunk"]
    for s in facts["sequences"]:
        at = row["branch_id"] == s["branch_id"]
        assert s["tokens"] == int(at.sum())
        times = row["time_id"][at]
        assert (s["time_start"], s["time_end"]) == (int(times.min()), int(times.max()))
        assert s["text"] == tokenizer.decode(row["input_ids"][at].tolist())
    texts = [s["text"] for s in facts["sequences"]]
    # The trunk's last token starts each branch; a prompt and its response are split by a newline.
    assert (texts[0] + texts[1]).startswith("Two ways to greet:Formal:\nGood day.") and "Hey!" in texts[2]
    # right alignment: both branches end on the same column
    assert len({s["time_end"] for s in facts["sequences"][1:]}) == 1
    for mode in MASK_MODES:
        pairs = spec_pairs(mode, row["branch_id"], row["time_id"], trunk=True)
        assert facts["masks"][mode]["visible_pairs"] == pairs

    with Image.open(shown["png"]) as image:
        assert json.loads(image.text[PNG_FACTS_KEY]) == facts


def test_cli_terminal_tables_show_the_facts(shard_dir: Path, shown: dict) -> None:
    result = run_cli("inspect", shard_dir, "--row", shown["row"]["index"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "sha256 of every file verified" in out
    assert shown["manifest"]["chat_template"]["file"] is None  # shard_dir used the tokenizer's own
    assert "chat template" in out and "the tokenizer's own" in out
    assert f"{shown['totals']['tokens']:,}, trained {shown['totals']['trained_tokens']:,}" in out
    for m in shown["row"]["masks"].values():
        assert f"{m['visible_pairs']:,}" in out
    for s in shown["row"]["sequences"]:
        assert f"{s['time_start']}..{s['time_end']}" in out
        assert s["text"].splitlines()[0] in out


def test_cli_records_file_is_packed_like_tokenize(
    tiny_model_dir: Path, records_file: Path, shown: dict
) -> None:
    index = shown["row"]["index"]
    args = ["inspect", records_file, "--tokenizer", tiny_model_dir, *PACKING_FLAGS, "--row", index]
    result = run_cli(*args, "--json", "--batch-size", 2)
    assert result.returncode == 0, result.stderr
    from_records = json.loads(result.stdout)
    assert from_records["source"]["kind"] == "records" and from_records["manifest"] is None
    assert from_records["totals"] == shown["totals"]
    assert from_records["row"] == shown["row"]
    assert sorted(p.name for p in records_file.parent.iterdir()) == ["records.jsonl", "row.png", "shards"]


def test_cli_corrupt_shard_is_a_one_line_error(shard_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    victim = broken / "shard-00001.arrow"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    line = one_line_error(run_cli("inspect", broken))
    assert "shard-00001.arrow" in line and "sha256" in line


def test_cli_tokenizer_must_give_the_shards_ids(
    tiny_model_dir: Path, shard_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    # Another chat template gives the same ids (inspect never renders a chat): accepted.
    templated = tmp_path / "templated-tokenizer"
    shutil.copytree(tiny_model_dir, templated)
    config = json.loads((templated / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (templated / "tokenizer_config.json").write_text(json.dumps(config))
    for leftover in templated.glob("chat_template.*"):
        leftover.unlink()
    result = run_cli("inspect", shard_dir, "--tokenizer", templated, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["source"]["tokenizer"] == str(templated)
    # One more token is another vocabulary: refused.
    grown = tmp_path / "grown-tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(str(grown))
    line = one_line_error(run_cli("inspect", shard_dir, "--tokenizer", grown))
    want = json.loads((shard_dir / "manifest.json").read_text())["tokenizer"]["vocab_sha256"][:12]
    assert "recorded tokenizer" in line and want in line and "re-run plora tokenize" in line


def test_cli_bad_requests_are_one_line_errors(shard_dir: Path, records_file: Path, tmp_path: Path) -> None:
    rows = json.loads((shard_dir / "manifest.json").read_text())["num_rows"]
    assert "out of range" in one_line_error(run_cli("inspect", shard_dir, "--row", rows))
    assert "no such" in one_line_error(run_cli("inspect", tmp_path / "absent"))
    assert "--tokenizer" in one_line_error(run_cli("inspect", records_file))
    (tmp_path / "a-file").write_text("")  # issue 10 item 21: a missing directory is made, a file is not
    png = tmp_path / "a-file" / "row.png"
    assert "cannot write PNG" in one_line_error(run_cli("inspect", shard_dir, "--png", png))
