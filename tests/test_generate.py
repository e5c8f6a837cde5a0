"""Parallel generation: KV-cached decoding against full recomputation, branch isolation, sampling, stops,
bad input, and the `plora generate` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error, run_cli
from models import tiny_model

import parallel
from parallel.decoder import Decoder, DecodeStep, _plan, decode_parallel
from parallel.errors import PloraError
from parallel.forward import forward_packed
from parallel.generation import IdenticalBranchesWarning, generate
from parallel.layout import PackedRow, SpecialTokens, TokenSequence, build_row
from parallel.loading import load_parallel_model
from parallel.rope2d import patch_model_2d_rope
from parallel.sampling import DistinctPaths, Sampler, SamplingOptions

SPECIAL = SpecialTokens(eos_id=2)
STRIDE = 16  # tests/models.py models have 256 positions: room for a few branches at this stride
TRUNK = [5, 6, 7, 8, 9]


def patched(arch: str, stride: int = STRIDE) -> torch.nn.Module:
    model = tiny_model(arch)
    patch_model_2d_rope(model, stride=stride)
    return model


@pytest.fixture(scope="module")
def bare_tiny(tiny_model_dir) -> tuple:
    """The tiny local model with its real tokenizer, 2D RoPE and no adapter."""
    model, tokenizer, config = load_parallel_model(tiny_model_dir, stride=STRIDE)
    assert config is None
    return model, tokenizer


def row_tensors(row: PackedRow) -> list[torch.Tensor]:
    return [torch.from_numpy(a.astype(np.int64))[None] for a in (row.input_ids, row.branch_id, row.time_id)]


def greedy_by_recomputation(
    model: torch.nn.Module, trunk: list[int], prompts: list[list[int]], mode: str, steps: int
) -> tuple[list[list[int]], list[dict[int, torch.Tensor]]]:
    """The reference: every step lays out the whole row with the contract's build_row, runs one
    forward_packed over it (no cache) and extends each branch by the argmax after its last token.
    Steps are in lockstep, which is time order whenever the branches start on one column."""
    grown = [list(p) for p in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    step_logits = []
    for _ in range(steps):
        row = build_row(
            TokenSequence.of(trunk, False) if trunk else None,
            [TokenSequence.of(g, False) for g in grown],
            "left",
            SPECIAL,
        )
        logits = forward_packed(model, *row_tensors(row), mask=mode)[0]
        first = 1 if row.trunk_len else 0
        rows = {}
        for k in range(len(prompts)):
            mine = np.flatnonzero(row.branch_id == first + k)
            rows[k] = logits[mine[-1] if len(mine) else row.trunk_len - 1]
        for k, scores in rows.items():
            token = int(scores.argmax())
            grown[k].append(token)
            generated[k].append(token)
        step_logits.append(rows)
    return generated, step_logits


CASES = [
    # (mode, prompts): columnar needs prompts of one length so that lockstep is time order.
    ("isolated", [[10, 11], [12], [], [13, 14, 15, 16]]),
    ("columnar", [[10, 11], [12, 13], [14, 15]]),
    ("columnar", [[], [], []]),
]


@pytest.mark.parametrize("arch", ["local", "qwen2", "llama", "mistral", "gemma2"])
@pytest.mark.parametrize(("mode", "prompts"), CASES)
def test_kv_cached_decoding_matches_recomputation(
    arch: str, mode: str, prompts: list[list[int]], request: pytest.FixtureRequest
) -> None:
    """ "local" is the tiny Qwen2-style model on disk (pipeline.tinymodel); the others tests/models.py's."""
    model = request.getfixturevalue("bare_tiny")[0] if arch == "local" else patched(arch)
    steps: list[DecodeStep] = []
    result = decode_parallel(
        model, TRUNK, prompts, special=SPECIAL, max_new_tokens=6, mask=mode, stop_ids=(), on_step=steps.append
    )
    expected, expected_logits = greedy_by_recomputation(model, TRUNK, prompts, mode, 6)
    assert result.tokens == expected
    assert len(steps) == 6
    for step, reference in zip(steps, expected_logits, strict=True):
        assert step.tokens.keys() == reference.keys()
        for k, scores in reference.items():
            torch.testing.assert_close(step.logits[k], scores, atol=1e-4, rtol=0)


def test_decoder_prefill_then_steps_is_decode_parallel() -> None:
    """The Decoder driven by hand: prefill() feeds the plan's prefill and samples exactly the branches
    whose prompt is all in it (columnar: the shortest); each step() feeds one token per branch with
    one pending, and step() says False once none has; the tokens are decode_parallel's."""
    model = patched("qwen2")
    prompts = [[10], [11, 12, 13], [14, 15]]
    expected = decode_parallel(model, TRUNK, prompts, special=SPECIAL, max_new_tokens=4, mask="columnar")
    plan = _plan(TRUNK, prompts, SPECIAL, "columnar", "left", None)
    decoder = Decoder(
        model,
        plan,
        mask="columnar",
        stride=STRIDE,
        sampler=Sampler(SamplingOptions(), torch.device("cpu")),
        max_new_tokens=4,
        stop_ids={SPECIAL.eos_id},
    )
    with torch.no_grad():
        decoder.prefill()
        assert [len(s.generated) for s in decoder.states] == [1, 0, 0] and plan.sources.keys() == {0}
        assert decoder.branch.shape[1] == len(plan.prefill_ids)
        while True:
            fed = sum(s.pending is not None for s in decoder.states)
            before = decoder.branch.shape[1]
            if not decoder.step():
                break
            assert decoder.branch.shape[1] == before + fed
    assert fed == 0 and decoder.steps == expected.steps
    assert [s.generated for s in decoder.states] == expected.tokens


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("mode", ["isolated", "columnar"])
def test_final_sequence_is_a_greedy_fixed_point(arch: str, mode: str) -> None:
    """One forward over the finished sequence predicts every generated token from the token before it,
    with the logits decoding used. In columnar mode with prompts of different lengths this holds only
    if decoding feeds tokens in time order (forced prompt tokens, finished branches' last tokens)."""
    model = patched(arch)
    prompts = [[10, 11, 12, 13], [14], [], [15, 16]]
    steps: list[DecodeStep] = []
    # A stop token that some branch produces early, so finished branches are part of the check.
    probe = decode_parallel(model, TRUNK, prompts, special=SPECIAL, max_new_tokens=8, mask=mode, stop_ids=())
    stop = probe.tokens[1][2]
    result = decode_parallel(
        model,
        TRUNK,
        prompts,
        special=SPECIAL,
        max_new_tokens=8,
        mask=mode,
        stop_ids={stop},
        on_step=steps.append,
    )
    assert "eos" in result.finish_reasons and len({len(t) for t in result.tokens}) > 1
    full = build_row(
        TokenSequence.of(TRUNK, False),
        [TokenSequence.of(p + g, False) for p, g in zip(prompts, result.tokens, strict=True)],
        "left",
        SPECIAL,
    )
    logits = forward_packed(model, *row_tensors(full), mask=mode)[0]
    used: dict[int, list[torch.Tensor]] = {}
    for step in steps:
        for k, scores in step.logits.items():
            used.setdefault(k, []).append(scores)
    for k, (prompt, generated) in enumerate(zip(prompts, result.tokens, strict=True)):
        mine = np.flatnonzero(full.branch_id == k + 1)
        for j, token in enumerate(generated):
            # The branch's token just before this one: its start token (docs/layout.md) for the first.
            scores = logits[mine[len(prompt) + j]]
            assert int(scores.argmax()) == token
            torch.testing.assert_close(used[k][j], scores, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("trunk", [TRUNK, []])
def test_isolated_branches_decode_alone_as_together(arch: str, trunk: list[int]) -> None:
    model = patched(arch)
    prompts = [[10, 11, 12], [13], [14, 15], [16, 17, 18, 19]]
    together = decode_parallel(model, trunk, prompts, special=SPECIAL, max_new_tokens=7, mask="isolated")
    first = 1 if trunk else 0
    for k, prompt in enumerate(prompts):
        alone = decode_parallel(
            model, trunk, [prompt], special=SPECIAL, max_new_tokens=7, mask="isolated", branch_ids=[first + k]
        )
        assert alone.tokens[0] == together.tokens[k]
    if not trunk:
        return
    # Under a trunk the branch id matters (2D RoPE: its distance to the trunk), if only a little here.
    seen: list[DecodeStep] = []
    for branch_id in (first, first + 7):
        decode_parallel(
            model,
            trunk,
            prompts[:1],
            special=SPECIAL,
            max_new_tokens=1,
            branch_ids=[branch_id],
            on_step=seen.append,
        )
    assert not torch.allclose(seen[0].logits[0], seen[1].logits[0], atol=1e-6, rtol=0)


def test_finished_branch_costs_nothing_more() -> None:
    model = patched("qwen2")
    prompts = [[10, 11], [12, 13], [14]]
    probe = decode_parallel(model, TRUNK, prompts, special=SPECIAL, max_new_tokens=8, stop_ids=())
    stop = probe.tokens[0][1]  # branch 0 stops after its second token
    steps: list[DecodeStep] = []
    result = decode_parallel(
        model, TRUNK, prompts, special=SPECIAL, max_new_tokens=8, stop_ids={stop}, on_step=steps.append
    )
    assert result.finish_reasons[0] == "eos" and len(result.tokens[0]) <= 2
    # Isolated mode: each token is fed once, except every branch's last one, which nobody needs.
    assert result.cache_tokens == result.prompt_tokens + result.generated_tokens - len(prompts)
    assert result.steps == max(len(t) for t in result.tokens) - 1
    assert all(0 not in s.tokens for s in steps[len(result.tokens[0]) :])


def test_sampling_is_reproducible_with_a_seed(bare_tiny) -> None:
    model, tokenizer = bare_tiny

    def run(seed: int) -> list[list[int]]:
        out = generate(
            model,
            tokenizer,
            "Once upon a time",
            num_branches=3,
            max_new_tokens=8,
            temperature=1.0,
            top_k=50,
            top_p=0.9,
            seed=seed,
        )
        return [b.token_ids for b in out.branches]

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    assert len({tuple(t) for t in first}) > 1  # branches draw independently from the same trunk


def test_sampler_filters() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    top1 = Sampler(SamplingOptions(temperature=1.0, top_k=1, seed=0), torch.device("cpu"))
    assert all(top1(logits).tolist() == [3, 0] for _ in range(20))
    nucleus = Sampler(SamplingOptions(temperature=1.0, top_p=0.5, seed=0), torch.device("cpu"))
    assert all(nucleus(logits).tolist() == [3, 0] for _ in range(20))  # p(3) = 0.64 > 0.5 alone
    wide = Sampler(SamplingOptions(temperature=5.0, seed=0), torch.device("cpu"))
    assert len({tuple(wide(logits).tolist()) for _ in range(50)}) > 1


@pytest.mark.parametrize("new_tokens", [10, pytest.param(60, marks=pytest.mark.slow)])
def test_text_api_stops_at_stop_strings(bare_tiny, new_tokens: int) -> None:
    model, tokenizer = bare_tiny
    branches = [" is", " was"]
    plain = parallel.generate(model, tokenizer, "The sea", branches=branches, max_new_tokens=new_tokens)
    text = plain.branches[0].text
    # Short: a stop near the start. Long: one from the last third, beyond the tail the check decodes.
    start = 4 if new_tokens == 10 else len(text) * 2 // 3
    stop = text[start : start + 3]
    assert stop.strip()
    cut = generate(model, tokenizer, "The sea", branches=branches, max_new_tokens=new_tokens, stop=[stop])
    if new_tokens > 10:
        assert len(cut.branches[0].token_ids) > 4 * len(stop) + 2
    assert cut.branches[0].text == text[: text.index(stop)]
    assert cut.branches[0].finish_reason == "stop"
    assert len(cut.branches[0].token_ids) < len(plain.branches[0].token_ids)
    other = cut.branches[1].token_ids
    assert other == plain.branches[1].token_ids[: len(other)]


def test_distinct_branches_never_repeat_a_path() -> None:
    """--distinct: with 2D RoPE off, isolated branches under one trunk see exactly the same context,
    so greedy writes one text K times; the rule sends branch k to the k-th best first token, and
    each branch then continues greedily on its own path (branch 0 is the plain greedy one)."""
    model = tiny_model("qwen2")
    patch_model_2d_rope(model, ratio=0.0, stride=STRIDE)
    k = 4
    steps: list[DecodeStep] = []
    plain = decode_parallel(
        model, TRUNK, [[]] * k, special=SPECIAL, max_new_tokens=6, stop_ids=(), on_step=steps.append
    )
    assert all(t == plain.tokens[0] for t in plain.tokens)
    distinct = decode_parallel(
        model, TRUNK, [[]] * k, special=SPECIAL, max_new_tokens=6, stop_ids=(),
        sampling=SamplingOptions(distinct=True),
    )  # fmt: skip
    assert distinct.tokens[0] == plain.tokens[0]
    assert [t[0] for t in distinct.tokens] == steps[0].logits[0].topk(k).indices.tolist()
    for n, tokens in enumerate(distinct.tokens):  # after its first token, each branch is greedy
        alone = decode_parallel(model, TRUNK, [tokens[:1]], special=SPECIAL, max_new_tokens=5, stop_ids=())
        assert alone.tokens[0] == tokens[1:], n


def test_distinct_paths_forbid_only_a_taken_next_token() -> None:
    paths = DistinctPaths(3)
    assert paths.forbidden(0) == set()
    paths.take(0, 7)
    assert paths.forbidden(1) == {7} and paths.forbidden(0) == set()
    paths.take(1, 9)
    paths.take(0, 3)
    assert paths.forbidden(2) == {7, 9}
    paths.take(2, 7)
    assert paths.forbidden(2) == {3}  # on branch 0's path, which went on with 3


@pytest.mark.parametrize("mask", ["isolated", "columnar"])
def test_distinct_sampled_and_finished_branches_never_repeat(mask: str) -> None:
    """Sampling draws from what is left; a branch that ended at EOS keeps the others from ending
    on the same tokens."""
    model = tiny_model("qwen2")
    patch_model_2d_rope(model, ratio=0.0, stride=STRIDE)
    sampled = decode_parallel(
        model, TRUNK, [[]] * 6, special=SPECIAL, max_new_tokens=4, stop_ids=(), mask=mask,
        sampling=SamplingOptions(temperature=0.3, seed=0, distinct=True),
    )  # fmt: skip
    assert len({tuple(t) for t in sampled.tokens}) == 6
    plain = decode_parallel(model, TRUNK, [[]] * 3, special=SPECIAL, max_new_tokens=4, stop_ids=())
    stop = plain.tokens[0][0]  # every branch's plain greedy path would end at once
    ended = decode_parallel(
        model, TRUNK, [[]] * 3, special=SPECIAL, max_new_tokens=4, stop_ids={stop},
        sampling=SamplingOptions(distinct=True),
    )  # fmt: skip
    assert ended.tokens[0] == [stop] and ended.finish_reasons[0] == "eos"
    assert all(t[0] != stop for t in ended.tokens[1:]) and len({tuple(t) for t in ended.tokens}) == 3


def test_marker_starts_each_branch_with_its_number(bare_tiny, recwarn) -> None:
    model, tokenizer = bare_tiny
    out = generate(model, tokenizer, "Three tips:", num_branches=3, marker="{k}.", max_new_tokens=2)
    assert [b.prompt for b in out.branches] == ["1.", "2.", "3."]
    numbered = generate(model, tokenizer, "Three tips:", branches=["1.", "2.", "3."], max_new_tokens=2)
    assert out.texts == numbered.texts
    assert not [w for w in recwarn if issubclass(w.category, IdenticalBranchesWarning)]


def test_greedy_identical_branches_warn(bare_tiny) -> None:
    model, tokenizer = bare_tiny
    with pytest.warns(IdenticalBranchesWarning):
        out = generate(model, tokenizer, "Hello", num_branches=2, max_new_tokens=2)
    assert out.branches[0].token_ids[0] == out.branches[1].token_ids[0]


@pytest.mark.filterwarnings("ignore::parallel.generation.IdenticalBranchesWarning")
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "  ", "num_branches": 2}, "prompt is empty"),
        ({"prompt": "Hi", "branches": ["a", " "]}, "branch 2 is empty"),
        ({"prompt": "Hi"}, "nothing to generate"),
        ({"prompt": "Hi", "branches": ["a"], "num_branches": 2}, "not both"),
        ({"branches": ["a"], "num_branches": None, "temperature": -1.0}, "--temperature"),
        ({"prompt": "Hi", "num_branches": 300}, "use fewer branches"),
        ({"prompt": "Hi", "num_branches": 2, "max_new_tokens": 5000}, "lower --max-new-tokens"),
        ({"prompt": "Hi", "num_branches": 2, "mask": "diagonal"}, "--mask"),
        ({"prompt": "Hi", "num_branches": 2, "lead": "Two:"}, "needs --prompt and --chat"),
        ({"num_branches": 2, "chat": True, "lead": "Two:"}, "needs --prompt and --chat"),
        (
            {"prompt": "Hi", "branches": ["a"], "marker": "{k}."},
            "--marker starts the branches of --num-branches",
        ),
        ({"prompt": "Hi", "num_branches": 2, "marker": "  "}, "--marker is blank"),
        (
            {"prompt": "Hi", "branches": ["a", "b"], "distinct": True},
            "--distinct keeps apart the branches of",
        ),
    ],
)
def test_bad_generation_input_is_one_line(bare_tiny, kwargs: dict, message: str) -> None:
    model, tokenizer = bare_tiny
    with pytest.raises(PloraError, match=message) as caught:
        generate(model, tokenizer, **kwargs)
    assert "\n" not in str(caught.value)


def test_no_trunk_no_bos_empty_branch_starts_from_eos() -> None:
    """Every branch has its own start token (issue 7 item 3): without a trunk or BOS, EOS."""
    result = decode_parallel(patched("qwen2"), [], [[10], []], special=SPECIAL, max_new_tokens=2, stop_ids=())
    assert [len(t) for t in result.tokens] == [2, 2]
    assert result.prompt_tokens == 3  # [eos, 10] and [eos]


def test_generate_command_json_and_table(tiny_model_dir) -> None:
    common = ["generate", "--base-model", tiny_model_dir, "--stride", STRIDE]
    done = run_cli(
        *common, "--prompt", "Hello", "--chat", "--branch", "One", "--branch", "Two",
        "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "1", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    tokens, summary = lines[:-1], lines[-1]
    assert summary["type"] == "summary" and len(summary["branches"]) == 2
    for k, branch in enumerate(summary["branches"]):
        assert [t["token_id"] for t in tokens if t["branch"] == k] == branch["token_ids"]
        assert 1 <= branch["tokens"] <= 4
    assert summary["generated_tokens"] == sum(b["tokens"] for b in summary["branches"])

    table = run_cli(
        *common, "--prompt", "Hello", "--num-branches", "3", "--max-new-tokens", "3",
        "--temperature", "0.8", "--seed", "1", "--marker", "{k})", "--distinct",
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "branch 3" in table.stdout and "tokens/s" in table.stdout
    assert "3)" in table.stdout  # the third branch's marker, shown as its prompt

    missing = run_cli("generate", "--adapter", "/nonexistent/adapter", "--prompt", "x", "--num-branches", "2")
    assert "no such adapter directory" in one_line_error(missing)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "Hi", "--branch", " "], "branch 1 is empty"),
        (["--prompt", "Hi"], "nothing to generate"),
        (["--prompt", "Hi", "--branches-file", "{missing}"], "no such file"),
        (["--prompt", "Hi", "--branches-file", "{bad_json}"], "bad.json:1: not valid JSON"),
        (["--prompt", "Hi", "--num-branches", "2", "--temperature", "-1"], "--temperature must be >= 0"),
        (["--prompt", "Hi", "--num-branches", "2", "--lead", "Two:"], "needs --prompt and --chat"),
        (
            ["--prompt", "Hi", "--branch", "a", "--marker", "-"],
            "--marker starts the branches of --num-branches",
        ),
        (["--prompt", "Hi", "--num-branches", "2", "--marker", " "], "--marker is blank"),
        (["--prompt", "Hi", "--branch", "a", "--distinct"], "--distinct keeps apart the branches of"),
    ],
)
def test_generate_command_bad_input_is_one_line(
    tiny_model_dir, tmp_path, args: list[str], message: str
) -> None:
    (tmp_path / "bad.json").write_text('["a", ')
    names = {"missing": tmp_path / "missing.txt", "bad_json": tmp_path / "bad.json"}
    argv = ["generate", "--base-model", tiny_model_dir, *(a.format(**names) for a in args)]
    assert message in one_line_error(run_cli(*argv))


def test_branches_file_forms(tmp_path) -> None:
    from cli.generate import read_branches_file

    (tmp_path / "b.txt").write_text("First,\n\n  Second\n")
    (tmp_path / "b.json").write_text(json.dumps(["One", "Two", "Three"]))
    (tmp_path / "wrong.json").write_text(json.dumps({"branches": ["x"]}))
    assert read_branches_file(tmp_path / "b.txt") == ["First,", "  Second"]
    assert read_branches_file(tmp_path / "b.json") == ["One", "Two", "Three"]
    with pytest.raises(PloraError, match="JSON array of branch prompt strings"):
        read_branches_file(tmp_path / "wrong.json")
