"""Masks: dense, FlexAttention mask_mod/BlockMask and a brute force written from docs/layout.md agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import collate, random_row
from torch.nn.attention.flex_attention import create_mask

from parallel.masks import block_mask, dense_mask, mask_mod


def brute_force(branch, time, valid, has_trunk, mode, window=None) -> torch.Tensor:
    """docs/layout.md "Attention", literally, one (q, k) pair at a time.

    isolated: time(k) <= time(q) and (k in q's branch, or k in the trunk).
    columnar: time(k) < time(q) or k is q. Padding neither sees nor is seen; a padding query
    keeps its own diagonal (parallel.masks documents why). ``window``: time(q) - time(k) < window.
    """
    batch, length = branch.shape
    out = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        for q in range(length):
            for k in range(length):
                if not valid[b, q]:
                    out[b, q, k] = q == k
                    continue
                if not valid[b, k]:
                    continue
                tq, tk = int(time[b, q]), int(time[b, k])
                if mode == "isolated":
                    in_trunk = has_trunk[b] and int(branch[b, k]) == 0
                    seen = tk <= tq and (int(branch[b, k]) == int(branch[b, q]) or in_trunk)
                else:
                    seen = tk < tq or q == k
                out[b, q, k] = seen and (window is None or tq - tk < window)
    return out


def random_batch(seed: int) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """Rows with and without trunk, left/right aligned, padded, then each row (pads included) shuffled."""
    rng = np.random.default_rng(seed)
    rows, trunks = [], []
    for _ in range(3):
        trunk_len = int(rng.choice([0, 0, 1, 3]))
        lens = [int(n) for n in rng.integers(1, 6, size=int(rng.integers(1, 4)))]
        rows.append(random_row(rng, trunk_len, lens, str(rng.choice(["left", "right"]))))
        trunks.append(rows[-1].trunk_len > 0)  # a trunk of one token is the branches' start, not a trunk
    batch = collate(rows)
    order = torch.stack([torch.from_numpy(rng.permutation(batch["input_ids"].shape[1])) for _ in rows])
    return {name: torch.gather(t, 1, order) for name, t in batch.items()}, trunks


@pytest.mark.parametrize("mode", ["isolated", "columnar"])
@pytest.mark.parametrize("window", [None, 3])
def test_dense_and_mask_mod_match_brute_force(mode: str, window: int | None) -> None:
    for seed in range(12):
        batch, trunks = random_batch(seed)
        branch, time, valid = batch["branch_id"], batch["time_id"], batch["attention_mask"].bool()
        want = brute_force(branch, time, valid, trunks, mode, window)
        dense = dense_mask(branch, time, mode, valid, window=window)
        assert dense.dtype == torch.bool and dense.shape == (len(trunks), 1, *want.shape[1:])
        assert torch.equal(dense[:, 0], want), f"seed {seed}"
        length = branch.shape[1]
        from_mod = create_mask(
            mask_mod(branch, time, mode, valid, window=window), len(trunks), 1, length, length
        )
        assert torch.equal(from_mod[:, 0], want), f"seed {seed}"


def test_no_padding_means_every_token_real() -> None:
    batch, trunks = random_batch(99)
    keep = batch["attention_mask"][0].bool()
    branch, time = batch["branch_id"][:1, keep], batch["time_id"][:1, keep]
    want = brute_force(branch, time, torch.ones_like(branch, dtype=torch.bool), trunks[:1], "isolated")
    assert torch.equal(dense_mask(branch, time)[:, 0], want)


def test_block_mask_is_sparse_for_branch_contiguous_rows_and_covers_the_dense_mask() -> None:
    rng = np.random.default_rng(0)
    # 8 branches of 128 tokens (127 and the start token), no trunk: isolated attention stays inside
    # the diagonal blocks.
    batch = collate([random_row(rng, 0, [127] * 8)])
    branch, time, valid = batch["branch_id"], batch["time_id"], batch["attention_mask"].bool()
    blocks = block_mask(branch, time, "isolated", valid).to_dense()[0, 0]
    assert torch.equal(blocks.bool(), torch.eye(8, dtype=torch.bool))
    # With a trunk and padding, every visible (q, k) lies in a block the BlockMask keeps.
    batch = collate([random_row(rng, 100, [90, 130, 60]), random_row(rng, 0, [200, 40], "right")])
    branch, time, valid = batch["branch_id"], batch["time_id"], batch["attention_mask"].bool()
    for mode in ("isolated", "columnar"):
        dense = dense_mask(branch, time, mode, valid)[:, 0]
        length = dense.shape[-1]
        padded = torch.nn.functional.pad(dense, (0, -length % 128, 0, -length % 128))
        needed = padded.unflatten(1, (-1, 128)).unflatten(3, (-1, 128)).any(dim=(2, 4))
        kept = block_mask(branch, time, mode, valid).to_dense()[:, 0].bool()
        assert torch.equal(kept, needed), mode


def test_bad_arguments_are_named() -> None:
    branch = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="mask mode"):
        dense_mask(branch, branch, "diagonal")
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        dense_mask(branch[0], branch[0])
    with pytest.raises(ValueError, match="attention_mask"):
        dense_mask(branch, branch, "isolated", torch.ones(1, 5, dtype=torch.bool))
