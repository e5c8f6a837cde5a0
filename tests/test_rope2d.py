"""2D RoPE patching: pair split per the contract, model's own RoPE scaling kept, no stale state."""

from __future__ import annotations

import copy

import pytest
import torch
from models import ARCHS, INTERLEAVED_ROTARY, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config

from parallel import forward_packed, patch_model_2d_rope
from parallel.columnar import patch_model_with_interleaved_2d_rope
from parallel.errors import PloraError
from parallel.forward import resolve_attn
from parallel.layout import branch_pair_indices
from parallel.rope2d import (
    CONFIG_KEY,
    TIME_SPAN,
    Rope2DConfig,
    Rope2DEmbedding,
    Rope2DError,
    auto_pair_indices,
    decode_positions,
    encode_positions,
    restore_2d_rope,
    rope2d_config,
)


@pytest.mark.parametrize("arch", ARCHS)
def test_cos_sin_take_each_pair_from_its_coordinate(arch: str) -> None:
    model = tiny_model(arch)
    rotary = model.model.rotary_emb
    config = patch_model_2d_rope(model, ratio=0.5, stride=16)
    wrapper = model.model.rotary_emb
    assert isinstance(wrapper, Rope2DEmbedding) and wrapper.rotary is rotary
    branch = torch.tensor([[0, 1, 1, 3, 5]])
    time = torch.tensor([[0, 4, 5, 9, 200]])
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = wrapper(x, encode_positions(branch, time, config.stride))
    cos_b, sin_b = rotary(x, branch * config.stride)
    cos_t, sin_t = rotary(x, time)
    n = config.num_pairs
    assert cos.shape[-1] == 2 * n  # the rotary's real dim (phi3: partial rotary)
    for pair in range(1, n + 1):
        dims = [2 * pair - 2, 2 * pair - 1] if arch in INTERLEAVED_ROTARY else [pair - 1, pair - 1 + n]
        want_cos, want_sin = (cos_b, sin_b) if pair in config.pair_indices else (cos_t, sin_t)
        assert torch.equal(cos[..., dims], want_cos[..., dims])
        assert torch.equal(sin[..., dims], want_sin[..., dims])


def test_pair_split_follows_contract_and_keeps_rope_scaling() -> None:
    model = tiny_model("llama")  # YaRN: attention_scaling != 1 must survive the patch
    scaling = model.model.rotary_emb.attention_scaling
    assert scaling != pytest.approx(1.0)
    assert auto_pair_indices(model, 0.5) == branch_pair_indices(8, 0.5) == [5, 6, 7, 8]
    assert auto_pair_indices(model, 0.25) == [7, 8]
    config = patch_model_2d_rope(model, ratio=0.25, stride=32)
    assert config == Rope2DConfig(ratio=0.25, stride=32, pair_indices=(7, 8), num_pairs=8)
    cos, _ = model.model.rotary_emb(torch.zeros(1), torch.zeros(1, 1, dtype=torch.long))
    assert torch.allclose(cos, torch.full_like(cos, scaling))  # cos(0) * attention_scaling everywhere
    phi3 = tiny_model("phi3")  # partial_rotary_factor 0.5: head_dim 16 -> 4 pairs
    assert auto_pair_indices(phi3, 0.5) == [3, 4]
    assert auto_pair_indices(phi3, 1.0) == [1, 2, 3, 4]


def test_positions_round_trip_and_plain_positions_are_branch_zero() -> None:
    branch = torch.tensor([[0, 2, 7]])
    time = torch.tensor([[5, 0, TIME_SPAN - 1]])
    b, t = decode_positions(encode_positions(branch, time, 128))
    assert torch.equal(b, branch * 128) and torch.equal(t, time)
    b, t = decode_positions(torch.arange(10)[None])
    assert torch.equal(b, torch.zeros(1, 10, dtype=torch.long)) and torch.equal(t, torch.arange(10)[None])
    with pytest.raises(ValueError, match="time_id"):
        encode_positions(branch, time + 1, 128)


def test_no_state_survives_a_call() -> None:
    """A plain forward on a patched model is the documented 1D default (branch 0, time = index),
    before and after packed calls with other branches: nothing from the last batch is reused."""
    model = tiny_model("qwen2")
    patch_model_2d_rope(model, ratio=0.5, stride=8)
    ids = torch.randint(3, 100, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
        zeros = torch.zeros_like(ids)
        as_branch0 = forward_packed(model, ids, zeros, torch.arange(9)[None])
        forward_packed(model, ids, torch.full_like(ids, 3), torch.arange(9)[None])
        after = model(ids).logits
    assert torch.equal(before, after)
    assert (before - as_branch0).abs().max() <= 1e-5

    # ...while the branch coordinate really rotates: a branch after a trunk reads it differently
    # as branch 1 or branch 3 (RoPE is relative, so a lone branch would not show it).
    def as_branch(k: int) -> torch.Tensor:
        branch = torch.tensor([[0] * 4 + [k] * 5])
        with torch.no_grad():
            return forward_packed(model, ids, branch, torch.arange(9)[None])

    assert (as_branch(1) - as_branch(3))[:, 4:].abs().max() > 1e-5  # fp32 noise is ~1e-7


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8, "factor": 4.0},
    ],
    ids=["dynamic", "longrope"],
)
def test_self_updating_rope_keeps_no_branch_state(rope: dict) -> None:
    """Dynamic NTK and longrope recompute their frequencies from each call's positions; the branch
    positions (branch_id * stride, far past max_position_embeddings) must not leak into the time
    rotation of the same or a later call."""
    config = tiny_config("llama")
    config.max_position_embeddings = 64
    config.rope_parameters = {"rope_theta": 10000.0, "original_max_position_embeddings": 64, **rope}
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    used = copy.deepcopy(fresh)
    for model in (fresh, used):
        patch_model_2d_rope(model, ratio=0.5, stride=128)
    ids = torch.randint(3, 100, (1, 100))
    one_branch = (torch.zeros_like(ids), torch.arange(100)[None])
    with torch.no_grad():
        forward_packed(used, ids, torch.arange(100)[None] // 25, (torch.arange(100) % 25)[None])
        want = forward_packed(fresh, ids, *one_branch)
        have = forward_packed(used, ids, *one_branch)
    assert torch.equal(want, have)


def test_patch_twice_is_idempotent_or_refused() -> None:
    model = tiny_model("mistral")
    first = patch_model_2d_rope(model, ratio=0.5, stride=64)
    assert patch_model_2d_rope(model, ratio=0.5, stride=64) == first
    assert sum(isinstance(m, Rope2DEmbedding) for m in model.modules()) == 1
    assert not isinstance(model.model.rotary_emb.rotary, Rope2DEmbedding)
    with pytest.raises(Rope2DError, match="already has 2D RoPE"):
        patch_model_2d_rope(model, ratio=0.25, stride=64)
    assert rope2d_config(model) == first
    assert getattr(model.config, CONFIG_KEY) == first.to_json()
    assert Rope2DConfig.from_json(model.config.to_dict()[CONFIG_KEY]) == first


def test_saved_config_restores_the_patch(tmp_path) -> None:
    model = tiny_model("phi3")
    assert restore_2d_rope(model) is None
    config = patch_model_2d_rope(model, ratio=0.5, stride=24)
    ids = torch.randint(3, 100, (1, 8))
    branch, time = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]]), torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5]])
    with torch.no_grad():
        want = forward_packed(model, ids, branch, time)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert rope2d_config(loaded) is None  # from_pretrained alone gives the plain model ...
    assert restore_2d_rope(loaded) == config  # ... until the recorded patch is re-applied
    with torch.no_grad():
        assert torch.equal(forward_packed(loaded, ids, branch, time), want)


def test_original_guide_names() -> None:
    model = tiny_model("qwen2")
    pairs = auto_pair_indices(model, ratio=0.5)
    config = patch_model_with_interleaved_2d_rope(model, pairs)
    assert config.pair_indices == tuple(pairs) == (5, 6, 7, 8)
    assert config.ratio == 0.5


def test_model_without_rope_is_refused_by_name() -> None:
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(Rope2DError, match=r"GPT2LMHeadModel \(model_type='gpt2'\).*no rotary embedding"):
        patch_model_2d_rope(gpt2)
    with pytest.raises(Rope2DError, match="GPT2LMHeadModel"):
        auto_pair_indices(gpt2, 0.5)


def test_resolve_attn() -> None:
    assert resolve_attn("auto", "cpu") == "sdpa"
    assert resolve_attn("auto", torch.device("cuda")) == "flex_attention"
    assert resolve_attn("flex", "cpu") == "flex_attention"
    assert resolve_attn("eager", "cpu") == "eager"
    with pytest.raises(PloraError, match="flash_attention_2"):
        resolve_attn("flash_attention_2", "cpu")


def test_trainer_reexports_auto_pair_indices() -> None:
    import trainer.train_hf_parallel_lora as guide

    assert guide.auto_pair_indices is auto_pair_indices
