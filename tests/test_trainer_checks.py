"""The trainer's loss (logits only at labelled tokens, chunked) against the full-logits loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from models import ARCHS, collate, random_row, tiny_model
from train_helpers import quick_config

from parallel import forward_packed, patch_model_2d_rope, token_losses
from parallel.errors import PloraError
from parallel.forward import LOSS_CHUNK_TOKENS, packed_token_losses
from pipeline.shards import open_shards
from trainer.data import RowStore
from trainer.loop import train
from trainer.model import check_positions

STRIDE = 16


def packed_batch(seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return collate([random_row(rng, 3, [4, 6]), random_row(rng, 0, [5, 2, 3], "right")])


def both_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], **kw: int
) -> tuple[torch.Tensor, ...]:
    args = (batch["input_ids"], batch["branch_id"], batch["time_id"])
    opts = {"mask": "isolated", "attention_mask": batch["attention_mask"]}
    full = token_losses(forward_packed(model, *args, **opts), batch["labels"])
    return full, packed_token_losses(model, *args, batch["labels"], **opts, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_labelled_only_loss_equals_the_full_logits_loss(arch: str) -> None:
    model = tiny_model(arch)
    if arch == "gemma2":
        model.config.final_logit_softcapping = 0.5  # small, so that leaving it out would show
    patch_model_2d_rope(model, ratio=0.5, stride=STRIDE)
    batch = packed_batch(1)
    with torch.no_grad():
        full, labelled = both_losses(model, batch, chunk_tokens=3)  # several chunks, a ragged last one
    assert labelled.dtype == torch.float32 and labelled.shape == batch["labels"].shape
    torch.testing.assert_close(labelled, full, atol=1e-5, rtol=0)
    assert float(full.abs().sum()) > 0


def lora_qwen2() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen2")
    patch_model_2d_rope(model, ratio=0.5, stride=STRIDE)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, lora)


@pytest.mark.parametrize(
    "chunk_tokens", [5, LOSS_CHUNK_TOKENS]
)  # recomputed chunks and a kept last one; one kept
def test_lora_gradients_through_the_chunked_loss_equal_the_full_logits_ones(chunk_tokens: int) -> None:
    model = lora_qwen2()
    batch = packed_batch(2)
    full, labelled = both_losses(model, batch, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(labelled, full, atol=1e-5, rtol=0)
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(full.sum(), params)
    got = torch.autograd.grad(labelled.sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert any(float(w.abs().sum()) > 0 for w in want)


@pytest.mark.parametrize("chunk_tokens", [5, LOSS_CHUNK_TOKENS])
def test_only_chunks_before_the_last_recompute_the_output_head(chunk_tokens: int) -> None:
    """Backward starts with the last chunk, when every activation is still alive: recomputing its
    logits would save no memory, so the head runs once for it and twice for each earlier chunk."""
    model = lora_qwen2()
    batch = packed_batch(2)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    args = (batch["input_ids"], batch["branch_id"], batch["time_id"], batch["labels"])
    losses = packed_token_losses(
        model, *args, attention_mask=batch["attention_mask"], chunk_tokens=chunk_tokens
    )
    losses.sum().backward()
    chunks = -(-int((batch["labels"] != -100).sum()) // chunk_tokens)
    assert len(calls) == 2 * chunks - 1


def test_a_row_without_labels_still_reaches_the_lora_weights() -> None:
    """DDP joins an empty micro-batch with a weightless row; its backward must still give (zero) grads."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("qwen2"), LoraConfig(r=2, target_modules=["q_proj"]))
    batch = packed_batch(3)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    args = (batch["input_ids"], batch["branch_id"], batch["time_id"], batch["labels"])
    loss = packed_token_losses(model, *args, attention_mask=batch["attention_mask"]).sum()
    loss.backward()
    assert float(loss) == 0.0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and float(g.abs().sum()) == 0.0 for g in grads)


def test_row_store_knows_the_largest_coordinates(train_shards: Path) -> None:
    shards = open_shards(train_shards)
    rows = [shards.row(i) for i in range(shards.manifest.num_rows)]
    want = (max(max(r.branch_id) for r in rows), max(max(r.time_id) for r in rows))
    assert RowStore(shards).max_coordinates == want
    assert want[0] >= 3 and want[1] > 0


def test_positions_past_max_position_embeddings_are_refused() -> None:
    model = tiny_model("qwen2")  # max_position_embeddings 256
    check_positions(model, 3, 255, 85, "shards")  # 3 x 85 = 255 and time 0..255: the last allowed positions
    with pytest.raises(PloraError, match=r"branch 3 x --stride 86 = RoPE position 258, .*\(at most 85\)"):
        check_positions(model, 3, 10, 86, "shards")
    with pytest.raises(PloraError, match="257 time positions exceed .* --max-seq-len"):
        check_positions(model, 0, 256, 0, "shards")


def test_a_continued_adapter_records_its_own_lora_settings(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    first = train(quick_config(train_shards, tiny_model_dir, tmp_path / "a", max_steps=1, lora_rank=4,
                               lora_targets="q_proj,v_proj", lora_dropout=0.0))  # fmt: skip
    # The command line's LoRA settings differ; the loaded adapter's are the ones in effect.
    second = train(quick_config(train_shards, tiny_model_dir, tmp_path / "b", max_steps=1, lora_rank=16,
                                lora_dropout=0.25, load_lora=str(first.final_dir)))  # fmt: skip
    for run in (first, second):
        recorded = json.loads((run.final_dir / "plora.json").read_text())["lora"]
        peft = json.loads((run.final_dir / "adapter_config.json").read_text())
        want = {"rank": 4, "alpha": peft["lora_alpha"], "dropout": 0.0, "targets": "q_proj,v_proj"}
        assert recorded == want
    # An adapter saved as a pickle (adapter_model.bin) is refused, not unpickled.
    pickled = Path(shutil.copytree(first.final_dir, tmp_path / "pickled"))
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    refused = r"^\S+pickled: no adapter_model.safetensors \(it has adapter_model.bin\)"
    with pytest.raises(PloraError, match=refused):
        train(quick_config(train_shards, tiny_model_dir, tmp_path / "c", max_steps=1, load_lora=str(pickled)))
