"""Padding-free batches (rows end to end with ``row_id``) and ``--attn auto``: oracles against the padded
dense path, the brute-force mask, and the shards' own rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from models import collate, random_row, tiny_model
from test_masks import brute_force
from test_prefix import STRIDE, TOL, lora_model, losses_and_grads

from parallel.forward import packed_token_losses, packs_rows, resolve_attn, settle_auto_attn
from parallel.generation import generate
from parallel.loading import load_parallel_model
from parallel.masks import dense_mask, mask_mod
from parallel.prefix import IMPLEMENTATION
from pipeline.shards import open_shards
from trainer.data import RowStore


def rows_of(with_trunk: bool, align: str) -> dict[str, torch.Tensor]:
    """Padded rows of unequal lengths and branch counts; a trunk in some rows or none."""
    rng = np.random.default_rng(11)
    trunks = [3, 0, 5] if with_trunk else [0, 0, 0]
    rows = [
        random_row(rng, trunks[0], [4, 6, 2], align),
        random_row(rng, trunks[1], [7, 3], align),
        random_row(rng, trunks[2], [5, 1, 3, 2], align),
    ]
    return collate(rows)


def joined(padded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The padded rows laid end to end in one sequence, with each token's row."""
    real = padded["attention_mask"].bool()
    out = {name: padded[name][real][None] for name in ("input_ids", "branch_id", "time_id", "labels")}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    out["row_id"] = real.nonzero()[:, 0][None]
    return out


def loss_run(model: torch.nn.Module, rows: dict[str, torch.Tensor]):
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        losses = packed_token_losses(
            model,
            rows["input_ids"],
            rows["branch_id"],
            rows["time_id"],
            rows["labels"],
            attention_mask=rows["attention_mask"],
            row_id=rows.get("row_id"),
            stride=STRIDE,
        )
        return losses, losses

    return run


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_padding_free_equals_padded_dense(arch: str) -> None:
    """Per-token losses and every LoRA gradient of the joined batch (prefix, and dense sdpa under the
    row-aware mask) equal the padded dense batch's; with and without trunks, left and right aligned."""
    prefix = lora_model(arch, resolve_attn("prefix", "cpu"))
    dense = lora_model(arch, "sdpa")
    for with_trunk in (True, False):
        for align in ("left", "right"):
            padded = rows_of(with_trunk, align)
            real = padded["attention_mask"].bool()
            _, want, want_grads = losses_and_grads(dense, loss_run(dense, padded))
            worst = 0.0
            for model in (prefix, dense):
                _, got, grads = losses_and_grads(model, loss_run(model, joined(padded)))
                worst = max(worst, float((got[0] - want[real]).abs().max()))
                worst = max(worst, max(float((grads[n] - g).abs().max()) for n, g in want_grads.items()))
            print(f"padding-free vs padded, {arch}, trunk {with_trunk}, {align}: max abs diff {worst:.2e}")
            assert worst <= TOL


@pytest.mark.parametrize("mode", ["isolated", "columnar"])
def test_row_aware_masks_equal_brute_force_per_row(mode: str) -> None:
    """The dense mask and the FlexAttention mask_mod of the joined batch are each row's brute-force mask
    on the diagonal blocks and False across rows."""
    for with_trunk in (True, False):
        padded = rows_of(with_trunk, "right")
        real = padded["attention_mask"].bool()
        trunks = [bool(t) for t in (with_trunk, False, with_trunk)]
        per_row = brute_force(padded["branch_id"], padded["time_id"], real, trunks, mode)
        lengths = real.sum(1).tolist()
        want = torch.block_diag(*[per_row[b, :n, :n] for b, n in enumerate(lengths)])
        rows = joined(padded)
        dense = dense_mask(rows["branch_id"], rows["time_id"], mode, row_id=rows["row_id"])[0, 0]
        assert torch.equal(dense, want)
        mod = mask_mod(rows["branch_id"], rows["time_id"], mode, row_id=rows["row_id"])
        q, k = torch.meshgrid(torch.arange(sum(lengths)), torch.arange(sum(lengths)), indexing="ij")
        assert torch.equal(mod(torch.zeros_like(q), None, q, k), want)


def test_collate_padding_free_holds_the_padded_rows(train_shards: Path) -> None:
    store = RowStore(open_shards(str(train_shards), verify=False))
    rows = np.array([3, 0, 5, 1])
    padded = store.collate(rows)
    free = store.collate(rows, padding_free=True)
    real = padded.attention_mask.bool()
    assert free.input_ids.shape == (1, int(real.sum()))
    for name in ("input_ids", "branch_id", "time_id", "labels"):
        assert torch.equal(getattr(free, name)[0], getattr(padded, name)[real])
    assert free.attention_mask.all()
    assert free.row_id is not None and torch.equal(free.row_id[0], real.nonzero()[:, 0])
    labelled = (padded.labels != -100).long()
    assert torch.equal(free.per_row((free.labels != -100).long()), padded.per_row(labelled))
    assert torch.equal(free.num_branches, padded.num_branches)


def test_auto_picks_prefix_for_isolated_rows_on_cpu() -> None:
    """prefix where it applies (and padding-free with it); sdpa for columnar rows, sliding windows and
    softcapping; an explicit choice is never changed."""
    cases = [("qwen2", "auto", "isolated", IMPLEMENTATION), ("llama", "auto", "isolated", IMPLEMENTATION)]
    cases += [("qwen2", "auto", "columnar", "sdpa"), ("mistral", "auto", "isolated", "sdpa")]
    cases += [("softcapped", "auto", "isolated", "sdpa"), ("qwen2", "sdpa", "isolated", "sdpa")]
    for arch, attn, mask, want in cases:
        model = tiny_model("qwen2" if arch == "softcapped" else arch, attn=resolve_attn(attn, "cpu"))
        if arch == "softcapped":  # as Gemma2's (which this transformers loads with eager only)
            model.config.attn_logit_softcapping = 50.0
        settle_auto_attn(model, attn, mask)
        assert model.config._attn_implementation == want, (arch, attn, mask)
        assert packs_rows(model, mask) == (want == IMPLEMENTATION)


def test_generation_with_auto_prefills_with_prefix(tiny_model_dir: Path) -> None:
    """load_parallel_model settles auto (prefix on the CPU; sdpa for a columnar request), and decoding
    with it (prefix prefill, masked SDPA steps) gives the tokens of the sdpa model."""
    results = {}
    for attn, mask in (("sdpa", None), ("auto", None), ("auto", "columnar")):
        model, tokenizer, _ = load_parallel_model(tiny_model_dir, attn=attn, mask=mask)
        results[attn, mask] = model.config._attn_implementation
        if mask is None:
            results[attn] = generate(model, tokenizer, "Hello", ["One", "Two"], max_new_tokens=6).texts
    assert results["auto", None] == IMPLEMENTATION
    assert results["auto", "columnar"] == results["sdpa", None] == "sdpa"
    assert results["auto"] == results["sdpa"]
