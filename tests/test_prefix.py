"""`--attn prefix` (parallel.prefix): outputs and LoRA gradients equal dense masked SDPA and the
brute-force mask of docs/layout.md, fp32, for every model family it applies to; refusals in one line."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error, run_plora
from models import collate, random_row, tiny_config, tiny_model
from test_generate import SPECIAL, TRUNK
from test_masks import brute_force
from train_helpers import max_adapter_difference, quick_config
from transformers import AutoModelForCausalLM

from parallel import prefix
from parallel.errors import PloraError
from parallel.forward import check_attn_mask, forward_packed, resolve_attn, token_losses
from parallel.generation import decode_parallel
from parallel.prefix import IMPLEMENTATION, prefix_plan
from parallel.rope2d import encode_positions, patch_model_2d_rope
from trainer.evaluate import EvalOptions, run_eval
from trainer.loop import train
from trainer.metrics import logs_dir, read_metrics

TOL = 1e-5
STRIDE = 16
# Every family of tests/models.py but gemma2 (softcapping, sliding layers: refused below). Mistral runs
# without its sliding window here: a window is refused (test_sliding_window_is_refused).
ARCHS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "cohere")


def lora_model(arch: str, impl: str) -> torch.nn.Module:
    """The tiny model with 2D RoPE and LoRA on every linear layer, B random (so that A has gradients)."""
    from peft import LoraConfig, get_peft_model

    config = tiny_config(arch)
    config.sliding_window = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32)
    patch_model_2d_rope(model, ratio=0.5, stride=STRIDE)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(model, lora).eval()


def batch(with_trunk: bool) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """Rows of different branch counts and lengths, left and right aligned, padded; the second row
    is stored in shuffled order (the contract gives token order no meaning)."""
    rng = np.random.default_rng(5)
    trunks = [4, 0, 2, 0] if with_trunk else [0, 0, 0, 0]
    rows = [
        random_row(rng, trunks[0], [5, 3, 7]),
        random_row(rng, trunks[1], [4, 8, 2], "right"),
        random_row(rng, trunks[2], [9, 1], "right"),
        random_row(rng, trunks[3], [6]),
    ]
    perms = [np.arange(r.num_tokens) for r in rows]
    perms[1] = rng.permutation(rows[1].num_tokens)
    return collate(rows, perms), [t > 0 for t in trunks]


def losses_and_grads(
    model: torch.nn.Module, run
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits, losses = run()
    losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return logits.detach(), losses.detach(), grads


def packed_run(model: torch.nn.Module, rows: dict[str, torch.Tensor]):
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward_packed(
            model,
            rows["input_ids"],
            rows["branch_id"],
            rows["time_id"],
            attention_mask=rows["attention_mask"],
            stride=STRIDE,
        )
        return logits, token_losses(logits, rows["labels"])

    return run


def brute_run(model: torch.nn.Module, rows: dict[str, torch.Tensor], trunks: list[bool]):
    """HF's own sdpa forward under docs/layout.md's mask written out pair by pair (tests/test_masks.py)."""
    valid = rows["attention_mask"].bool()
    mask = brute_force(rows["branch_id"], rows["time_id"], valid, trunks, "isolated")[:, None]
    positions = encode_positions(rows["branch_id"] * valid, rows["time_id"] * valid, STRIDE)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=rows["input_ids"], attention_mask=mask, position_ids=positions).logits
        return logits, token_losses(logits, rows["labels"])

    return run


@pytest.fixture(params=["one group", "a group per length"])
def grouping(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CPU's grouping (one group for these short rows) and one where every call is free, so that
    each length gets its own group: trunks and branches of several lengths apart, with and without
    a prefix."""
    if request.param == "a group per length":
        monkeypatch.setitem(prefix.GROUP_OVERHEAD_SLOTS, "cpu", 0)
    return str(request.param)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_equals_dense_sdpa_and_brute_force(arch: str, grouping: str) -> None:
    """Logits, per-token losses and every LoRA gradient; batches with and without trunks."""
    prefix_model = lora_model(arch, resolve_attn("prefix", "cpu"))
    dense = lora_model(arch, "sdpa")
    for with_trunk in (True, False):
        rows, trunks = batch(with_trunk)
        real = rows["attention_mask"].bool()
        got = losses_and_grads(prefix_model, packed_run(prefix_model, rows))
        worst = 0.0
        for run in (packed_run(dense, rows), brute_run(dense, rows, trunks)):
            want = losses_and_grads(dense, run)
            worst = max(worst, float((got[0][real] - want[0][real]).abs().max()))
            worst = max(worst, float((got[1] - want[1]).abs().max()))
            worst = max(worst, max(float((got[2][n] - g).abs().max()) for n, g in want[2].items()))
        print(f"prefix vs dense and brute force, {arch}, {grouping}, trunk {with_trunk}: {worst:.2e}")
        assert worst <= TOL


def visible_keys(plan: prefix.PrefixPlan) -> dict[int, set[int]]:
    """The keys the plan's SDPA calls show each real token (flat indices), read off its groups."""
    seen = {}
    offset = 0
    for group in plan.groups:
        n, width = group.queries.shape
        for i in range(n):
            for a in range(width):
                token = int(group.queries[i, a])
                if int(plan.inverse[token]) != offset + i * width + a:
                    continue  # a padding slot
                causal = torch.arange(group.keys.shape[1]) <= a
                allowed = group.mask[i, 0, a] if group.mask is not None else causal
                seen[token] = {int(k) for k in group.keys[i][allowed]}
        offset += n * width
    return seen


def test_plan_shows_each_token_what_the_contract_lets_it_see(grouping: str) -> None:
    """Every real token's keys are exactly the brute-force mask's; padding takes the zero row. Rows
    with a trunk of 3 (4 less the start), none, 1, and a row holding one sequence (a trunk)."""
    rows, trunks = batch(True)
    valid = rows["attention_mask"].bool()
    plan = prefix_plan(rows["branch_id"], rows["time_id"], valid)
    allowed = brute_force(rows["branch_id"], rows["time_id"], valid, trunks, "isolated")
    length = valid.shape[1]
    want = {
        int(b) * length + int(q): {int(b) * length + int(k) for k in allowed[b, q].nonzero()[:, 0]}
        for b, q in valid.nonzero()
    }
    assert visible_keys(plan) == want
    slots = sum(g.queries.numel() for g in plan.groups)
    assert (plan.inverse[~valid.reshape(-1)] == slots).all()
    masked = [g.mask is not None for g in plan.groups]
    if grouping == "one group":
        assert masked == [True]
    else:  # 11 sequences, apart by length: groups with prefixes and without
        assert len(plan.groups) > 2 and any(masked) and not all(masked)


def cost(groups: list[np.ndarray], own: np.ndarray, pre: np.ndarray, overhead: int) -> int:
    """Slots a grouping computes, plus ``overhead`` a group."""
    return sum(overhead + len(g) * own[g].max() * (pre[g].max() + own[g].max()) for g in groups)


def test_grouping_is_the_cheapest_cut_of_the_length_order() -> None:
    """Against every way to cut the sequences, sorted by (own length, prefix length), into runs."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(1, 8))
        own, pre = rng.integers(1, 60, n), rng.integers(0, 40, n) * rng.integers(0, 2, n)
        overhead = int(rng.choice([0, 300, 3000]))
        given = (own, pre, overhead)

        got = prefix._grouping(own, pre, overhead)
        assert sorted(np.concatenate(got).tolist()) == list(range(n))
        order = np.lexsort((pre, own))
        cuts = itertools.product([False, True], repeat=n - 1)
        best = min(cost(np.split(order, [i + 1 for i, c in enumerate(cut) if c]), *given) for cut in cuts)
        assert cost(got, *given) == best


def test_grouping_by_length_computes_fewer_slots_than_one_group() -> None:
    """Alpaca-like branches (30 to 300 tokens): the CPU's grouping pads far less than one group."""
    rng = np.random.default_rng(0)
    own, pre = rng.integers(30, 300, 16), np.zeros(16, dtype=np.int64)
    groups = prefix._grouping(own, pre, prefix.GROUP_OVERHEAD_SLOTS["cpu"])
    slots = sum(len(g) * own[g].max() ** 2 for g in groups)
    assert len(groups) > 1 and slots < 0.5 * len(own) * own.max() ** 2


def test_prefix_prefill_decodes_like_dense() -> None:
    """Generation: the prefill runs the plan, each decode step a plain mask over the cache."""
    prompts = [[10, 11, 12], [13], []]
    tokens = {}
    for impl in ("sdpa", resolve_attn("prefix", "cpu")):
        model = tiny_model("qwen2", attn=impl)
        patch_model_2d_rope(model, stride=STRIDE)
        result = decode_parallel(model, TRUNK, prompts, special=SPECIAL, max_new_tokens=5, stop_ids=())
        tokens[impl] = result.tokens
    assert tokens["sdpa"] == tokens[IMPLEMENTATION]


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_is_refused(arch: str) -> None:
    model = tiny_model(arch, attn=resolve_attn("prefix", "cpu"))
    rows, _ = batch(True)
    with pytest.raises(PloraError, match="--attn prefix cannot apply .* sliding window; use --attn sdpa"):
        forward_packed(
            model,
            rows["input_ids"],
            rows["branch_id"],
            rows["time_id"],
            attention_mask=rows["attention_mask"],
        )


def test_columnar_mask_is_refused() -> None:
    with pytest.raises(PloraError, match="isolated rows only"):
        check_attn_mask("prefix", "columnar")
    check_attn_mask("prefix", "isolated")
    check_attn_mask("sdpa", "columnar")
    model = tiny_model("qwen2", attn=resolve_attn("prefix", "cpu"))
    rows, _ = batch(True)
    with pytest.raises(PloraError, match="isolated rows only"):
        forward_packed(model, rows["input_ids"], rows["branch_id"], rows["time_id"], mask="columnar")


def test_train_prefix_columnar_is_one_line(
    plora_bin: Path, train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = ["--shards", train_shards, "--base-model", tiny_model_dir, "--out-dir", tmp_path / "out"]
    line = one_line_error(run_plora(plora_bin, "train", *args, "--attn", "prefix", "--mask", "columnar"))
    assert "--attn prefix computes isolated rows only" in line
    assert not (tmp_path / "out").exists()


def test_training_and_eval_with_prefix_match_sdpa(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The trainer and `plora eval` on real shards (packed rows without trunks, padded batches): the
    same logged losses and gradient norms (Adam's step would hide a gradient's scale), adapters, eval."""
    logged, finals, means = {}, {}, {}
    for attn in ("sdpa", "prefix"):
        out = tmp_path / attn
        cfg = quick_config(
            train_shards, tiny_model_dir, out, attn=attn, max_steps=2, batch_size=2, log_interval=1
        )
        finals[attn] = train(cfg).final_dir
        records = read_metrics(logs_dir(out, "hf_parallel_lora") / "metrics.jsonl")
        logged[attn] = [(r["loss"], r["grad_norm"]) for r in records if "loss" in r]
        options = EvalOptions(
            shards=str(train_shards), base_model=str(tiny_model_dir), adapter=str(finals[attn]), attn=attn,
            device="cpu", max_rows=4,
        )  # fmt: skip
        means[attn] = run_eval(options)[0].mean
    assert len(logged["prefix"]) == 2
    assert np.allclose(logged["prefix"], logged["sdpa"], rtol=1e-5, atol=0)
    assert max_adapter_difference(finals["sdpa"], finals["prefix"]) < 1e-5
    assert abs(means["sdpa"] - means["prefix"]) < 1e-5
