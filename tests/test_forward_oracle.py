"""Oracle tests of forward_packed across architectures (fp32, tiny random models).

(a) ratio 0, one branch, no trunk: the unpatched HuggingFace model's own logits.
(b) isolated: every token of a packed row (trunk + branches) = trunk + that branch run alone.
(c) permuting a row's tokens leaves every token's loss unchanged.
(d) flex: FlexAttention BlockMask logits = dense-mask logits (masks are checked in test_masks.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import ARCHS, VOCAB, collate, random_row, tiny_model

from parallel import forward_packed, patch_model_2d_rope, token_losses
from parallel.errors import PloraError
from parallel.forward import packed_loss
from parallel.layout import IGNORE_INDEX

TOL = 1e-5
STRIDE = 16


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_a_ratio_zero_single_branch_is_the_unpatched_model(arch: str) -> None:
    """Rows of 14 and 9 tokens, right-padded: longer than the sliding window of mistral/gemma2."""
    model = tiny_model(arch)
    ids = torch.randint(3, VOCAB, (2, 14), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 9:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=attention_mask).logits
        patch_model_2d_rope(model, ratio=0.0, stride=STRIDE)
        time = torch.arange(14).expand(2, 14)
        got = forward_packed(model, ids, torch.zeros_like(ids), time, attention_mask=attention_mask)
    real = attention_mask.bool()
    diff = max_diff(got[real], want[real])
    print(f"oracle (a) {arch}: max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_unpatched_model_places_tokens_by_time_alone(arch: str) -> None:
    """With no 2D RoPE patch and no stride given, the branch must not enter the positions: a
    one-branch row is the plain HF forward, and in a packed row trunk + each branch is the plain
    forward of that text (its time ids are 0..n-1)."""
    model = tiny_model(arch)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    row = collate([random_row(np.random.default_rng(3), 4, [5, 3, 7])])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = forward_packed(model, ids, torch.zeros_like(ids), torch.arange(9)[None])
        worst = max_diff(got, want)
        packed = forward_packed(model, row["input_ids"], row["branch_id"], row["time_id"])
        branch, time = row["branch_id"][0], row["time_id"][0]
        for k in (1, 2, 3):
            keep = (branch == 0) | (branch == k)
            assert time[keep].tolist() == list(range(int(keep.sum())))
            alone = model(input_ids=row["input_ids"][0, keep][None]).logits
            worst = max(worst, max_diff(packed[0, keep], alone[0]))
    print(f"unpatched {arch}: max abs diff {worst:.2e}")
    assert worst <= TOL


TRUNKS = (True, False, True)  # which rows of packed_batch have a trunk


def packed_batch(seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    rows = [
        random_row(rng, 4, [5, 3, 7]),  # trunk + branches, left aligned
        random_row(rng, 0, [4, 8, 2], "right"),  # text row, branches end together
        random_row(rng, 2, [9, 1], "right"),
    ]
    return collate(rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_b_isolated_row_equals_trunk_plus_each_branch_alone(arch: str) -> None:
    model = tiny_model(arch)
    patch_model_2d_rope(model, ratio=0.5, stride=STRIDE)
    batch = packed_batch(0)
    with torch.no_grad():
        packed = forward_packed(
            model,
            batch["input_ids"],
            batch["branch_id"],
            batch["time_id"],
            attention_mask=batch["attention_mask"],
        )
        worst, checked = 0.0, 0
        for row in range(batch["input_ids"].shape[0]):
            real = batch["attention_mask"][row].bool()
            branch = batch["branch_id"][row]
            has_trunk = TRUNKS[row]
            for k in branch[real].unique().tolist():
                keep = real & ((branch == k) | ((branch == 0) & has_trunk))
                alone = forward_packed(
                    model,
                    batch["input_ids"][row, keep][None],
                    batch["branch_id"][row, keep][None],
                    batch["time_id"][row, keep][None],
                )
                worst = max(worst, max_diff(packed[row, keep], alone[0]))
                checked += 1
    print(f"oracle (b) {arch}: {checked} sub-rows, max abs diff {worst:.2e}")
    assert checked == 10  # row 0: trunk + 3 branches, row 1: 3 branches, row 2: trunk + 2
    assert worst <= TOL


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["isolated", "columnar"])
def test_c_permuting_a_row_keeps_every_token_loss(arch: str, mode: str) -> None:
    model = tiny_model(arch)
    patch_model_2d_rope(model, ratio=0.5, stride=STRIDE)
    rng = np.random.default_rng(1)
    rows = [random_row(rng, 3, [4, 6]), random_row(rng, 0, [5, 2, 3], "right")]
    perms = [rng.permutation(r.num_tokens) for r in rows]
    with torch.no_grad():
        losses = []
        for batch in (collate(rows), collate(rows, perms)):
            logits = forward_packed(
                model,
                batch["input_ids"],
                batch["branch_id"],
                batch["time_id"],
                mask=mode,
                attention_mask=batch["attention_mask"],
            )
            losses.append(token_losses(logits, batch["labels"]))
    worst = 0.0
    for i, perm in enumerate(perms):
        n = len(perm)
        worst = max(worst, max_diff(losses[1][i, :n], losses[0][i, torch.from_numpy(perm)]))
    print(f"oracle (c) {arch} {mode}: max abs loss diff {worst:.2e}")
    assert worst <= TOL
    assert float(losses[0].abs().sum()) > 0  # the labels were really scored


def test_packed_loss_is_the_mean_of_token_losses_without_shift() -> None:
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 3, 0], [IGNORE_INDEX] * 4 + [6]])
    total, count = packed_loss(logits, labels)
    assert int(count) == 5
    want = torch.nn.functional.cross_entropy(logits[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    assert abs(float(total / count) - float(want)) < 1e-6


def test_attention_kinds_it_cannot_mask_are_refused() -> None:
    model = tiny_model("llama")
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(PloraError, match="'sdpa' attention, not 'eager'"):
        forward_packed(model, ids, ids, torch.arange(3)[None], attn="eager")
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        forward_packed(model, ids[0], ids[0], torch.arange(3))


def test_flex_blockmask_logits_equal_dense_mask_logits() -> None:
    """FLEX (slow: compiles flex_attention on CPU, forward only). Both modes, with padding."""
    batch = packed_batch(2)
    args = (batch["input_ids"], batch["branch_id"], batch["time_id"])
    real = batch["attention_mask"].bool()
    for mode in ("isolated", "columnar"):
        logits = {}
        for attn in ("sdpa", "flex_attention"):
            model = tiny_model("qwen3", attn=attn)
            patch_model_2d_rope(model, ratio=0.5, stride=STRIDE)
            with torch.no_grad():
                logits[attn] = forward_packed(model, *args, mask=mode, attention_mask=batch["attention_mask"])
        diff = max_diff(logits["sdpa"][real], logits["flex_attention"][real])
        print(f"flex vs dense ({mode}): max abs diff {diff:.2e}")
        assert diff <= TOL
