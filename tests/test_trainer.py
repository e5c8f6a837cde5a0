"""The trainer in-process on real shards of the sample data and the tiny model: data plan, collation,
schedule, loss going down, checkpoint contents, and every bad setting failing before the first step."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import max_adapter_difference, quick_config

from parallel.errors import PloraError
from parallel.layout import IGNORE_INDEX
from pipeline.inspect import padding_waste
from pipeline.shards import open_shards
from trainer.data import (
    RowStore,
    epoch_order,
    make_plan,
    micro_batches,
    step_rows,
    validation_batches,
)
from trainer.distributed import DistEnv
from trainer.evaluate import EvalOptions, run_eval
from trainer.loop import lr_at, train
from trainer.metrics import logs_dir, read_metrics

# ---------------------------------------------------------------------------------------------------
# Data plan: exact step counts, disjoint per-process slices, world-size independence
# ---------------------------------------------------------------------------------------------------


def test_plan_counts_steps_exactly_and_covers_every_row_once_per_epoch() -> None:
    plan = make_plan(
        37, val_fraction=0.0, seed=3, batch_size=3, world_size=2, accumulation_steps=2, epochs=2, max_steps=0
    )
    assert plan.global_batch == 12
    assert plan.steps_per_epoch == 4  # ceil(37 / 12): the short last step is kept, not dropped
    assert plan.total_steps == 8
    lengths = np.arange(37)
    for epoch in range(2):
        order = epoch_order(plan, epoch, seed=3, lengths=lengths, group_by_length=False)
        seen: list[int] = []
        for step in range(plan.steps_per_epoch):
            rows = step_rows(order, plan, step)
            parts = [p for rank in range(2) for p in micro_batches(rows, plan, rank)]
            assert len(parts) == 4
            assert sorted(np.concatenate(parts).tolist()) == sorted(rows.tolist())
            assert max(len(p) for p in parts) <= plan.batch_size
            seen += rows.tolist()
        assert sorted(seen) == list(range(37))
    last = micro_batches(step_rows(order, plan, 3), plan, 1)
    assert [len(p) for p in last] == [0, 0]  # one row left: the other slices are empty (weightless rows)
    capped = make_plan(
        37, val_fraction=0.0, seed=3, batch_size=3, world_size=2, accumulation_steps=2, epochs=2, max_steps=5
    )
    assert capped.total_steps == 5


def test_global_batches_do_not_depend_on_the_number_of_processes() -> None:
    two = make_plan(
        50, val_fraction=0.1, seed=1, batch_size=2, world_size=2, accumulation_steps=1, epochs=1, max_steps=0
    )
    one = make_plan(
        50, val_fraction=0.1, seed=1, batch_size=4, world_size=1, accumulation_steps=1, epochs=1, max_steps=0
    )
    assert len(two.val_rows) == 5 and set(two.val_rows).isdisjoint(two.train_rows)
    lengths = np.ones(50, dtype=np.int64)
    order_two = epoch_order(two, 0, 1, lengths, False)
    order_one = epoch_order(one, 0, 1, lengths, False)
    for step in range(two.steps_per_epoch):
        assert step_rows(order_two, two, step).tolist() == step_rows(order_one, one, step).tolist()
    shares = [np.concatenate(validation_batches(two, rank)) for rank in range(2)]
    assert sorted(np.concatenate(shares).tolist()) == two.val_rows.tolist()


def test_bad_split_is_refused() -> None:
    with pytest.raises(PloraError, match="leaves no training rows"):
        make_plan(3, val_fraction=0.9, seed=0, batch_size=1, world_size=1, accumulation_steps=1, epochs=1,
                  max_steps=0)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------------


def test_collate_pads_each_row_exactly_as_stored(train_shards: Path) -> None:
    shards = open_shards(train_shards)
    assert len(shards.manifest.files) >= 3  # the rows below come from several files
    store = RowStore(shards)
    rows = np.array([len(store) - 1, 0, 9, 17, 3, 8])
    batch = store.collate(rows)
    width = max(shards.row(int(i)).num_tokens for i in rows)
    assert tuple(batch.input_ids.shape) == (len(rows), width)
    for b, index in enumerate(rows):
        row = shards.row(int(index))
        n = row.num_tokens
        assert batch.input_ids[b, :n].tolist() == row.input_ids.tolist()
        assert batch.branch_id[b, :n].tolist() == row.branch_id.tolist()
        assert batch.time_id[b, :n].tolist() == row.time_id.tolist()
        assert batch.labels[b, :n].tolist() == row.labels.tolist()
        assert batch.attention_mask[b].tolist() == [1] * n + [0] * (width - n)
        assert (batch.labels[b, n:] == IGNORE_INDEX).all()
        assert int(batch.num_branches[b]) == row.num_branches
    weightless = store.weightless(5)
    assert (weightless.labels == IGNORE_INDEX).all() and weightless.num_tokens == shards.row(5).num_tokens


def test_group_by_length_batches_similar_rows(train_shards: Path) -> None:
    store = RowStore(open_shards(train_shards))
    plan = make_plan(len(store), val_fraction=0.0, seed=0, batch_size=4, world_size=1, accumulation_steps=1,
                     epochs=1, max_steps=0)  # fmt: skip

    def padded_tokens(order: np.ndarray) -> int:
        return sum(
            len(part) * int(store.num_tokens[part].max())
            for step in range(plan.steps_per_epoch)
            for part in micro_batches(step_rows(order, plan, step), plan, 0)
            if len(part)
        )

    plain = epoch_order(plan, 0, 0, store.num_tokens, group_by_length=False)
    grouped = epoch_order(plan, 0, 0, store.num_tokens, group_by_length=True)
    assert sorted(grouped.tolist()) == sorted(plain.tolist())
    assert padded_tokens(grouped) < padded_tokens(plain)


def test_group_by_length_spreads_a_short_run_over_all_lengths() -> None:
    plan = make_plan(400, val_fraction=0.0, seed=0, batch_size=4, world_size=1, accumulation_steps=2,
                     epochs=2, max_steps=0)  # fmt: skip
    lengths = np.random.default_rng(5).permutation(np.arange(10, 410))  # 400 distinct lengths
    span = np.ptp(lengths)
    for seed in range(5):
        order = epoch_order(plan, 0, seed, lengths, group_by_length=True)
        steps = [step_rows(order, plan, s) for s in range(plan.steps_per_epoch)]
        for rows in steps:  # each global batch: consecutive lengths
            assert np.ptp(lengths[rows]) == plan.global_batch - 1
        # 10 of 50 steps: rows from far apart in the range, centred near the middle, as a random draw is.
        first = lengths[np.concatenate(steps[:10])]
        assert np.ptp(first) > 0.4 * span
        assert abs(first.mean() - lengths.mean()) < 0.25 * span
        again = epoch_order(plan, 1, seed, lengths, group_by_length=True)
        assert again.tolist() != order.tolist()  # each epoch shuffles its batches anew


def test_group_by_length_wastes_what_inspect_says() -> None:
    """`plora inspect` reports the padding of batches of length-sorted rows; a grouped epoch has it."""
    plan = make_plan(400, val_fraction=0.0, seed=0, batch_size=4, world_size=1, accumulation_steps=1,
                     epochs=1, max_steps=0)  # fmt: skip
    lengths = np.random.default_rng(6).integers(20, 500, size=400)
    order = epoch_order(plan, 0, 0, lengths, group_by_length=True)
    batches = [lengths[step_rows(order, plan, s)] for s in range(plan.steps_per_epoch)]
    waste = sum(len(b) * b.max() - b.sum() for b in batches) / sum(len(b) * b.max() for b in batches)
    assert waste == pytest.approx(padding_waste(np.sort(lengths), plan.batch_size))


# ---------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------


def test_learning_rate_warms_up_then_decays_to_the_floor(tmp_path: Path) -> None:
    cfg = quick_config(tmp_path, tmp_path, tmp_path, learning_rate=1e-3, warmup=4, min_lr_ratio=0.1)
    lrs = [lr_at(step, cfg, 20) for step in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[-1] >= 1e-4 and lr_at(20, cfg, 20) == pytest.approx(1e-4)
    linear = quick_config(tmp_path, tmp_path, tmp_path, learning_rate=1e-3, schedule="linear",
                          min_lr_ratio=0.0)  # fmt: skip
    assert lr_at(5, linear, 10) == pytest.approx(5e-4)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_run_lowers_the_loss_and_writes_a_complete_adapter(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = quick_config(
        train_shards, tiny_model_dir, tmp_path / "out", epochs=3, save_interval=10, val_fraction=0.1, warmup=2
    )
    result = train(cfg)
    plan_rows = len(open_shards(train_shards)) - round(0.1 * len(open_shards(train_shards)))
    assert result.steps == 3 * -(-plan_rows // 4)
    assert result.last_loss < result.first_loss
    final = result.final_dir
    assert final == tmp_path / "out" / "lora" / "hf_parallel_lora_final"
    names = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "plora.json",
        "trainer_state/optimizer.safetensors",
        "trainer_state/state.json",
    } <= names
    assert all(n.endswith((".json", ".safetensors", ".md")) for n in names)  # nothing pickled
    assert (tmp_path / "out" / "lora" / "hf_parallel_lora_step10").is_dir()
    meta = json.loads((final / "plora.json").read_text())
    manifest = open_shards(train_shards).manifest
    assert meta["base_model"] == str(tiny_model_dir)
    assert meta["tokenizer"] == manifest.tokenizer
    assert (meta["rope_2d_ratio"], meta["stride"]) == (0.5, 128)
    assert (meta["mask"], meta["align"]) == ("isolated", "left")
    assert meta["pair_indices"] == [5, 6, 7, 8]  # head_dim 16: 8 pairs, the lowest-frequency half
    targets = {name.rsplit(".", 1)[-1] for name in json.loads((final / "adapter_config.json").read_text())[
        "target_modules"]}  # fmt: skip
    assert "lm_head" not in targets and {"q_proj", "v_proj", "down_proj"} <= targets
    records = read_metrics(logs_dir(tmp_path / "out", "hf_parallel_lora") / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r][-1] == result.steps
    assert any("val_loss" in r for r in records)

    # The same positions and mask as training, on every row: the adapter beats the base model.
    options = EvalOptions(shards=str(train_shards), base_model=str(tiny_model_dir), device="cpu")
    before, _ = run_eval(options)
    after, described = run_eval(dataclasses.replace(options, adapter=str(final)))
    assert described["pair_indices"] == [5, 6, 7, 8]
    assert after.tokens == before.tokens == manifest.num_trained
    assert after.mean < before.mean - 0.03
    assert sum(n for _, n, _ in after.by_branches.values()) == after.tokens
    other = Path(shutil.copytree(final, tmp_path / "other-vocabulary"))
    meta["tokenizer"]["vocab_sha256"] = "0" * 64
    (other / "plora.json").write_text(json.dumps(meta))
    with pytest.raises(PloraError, match=r"^adapter .*: recorded tokenizer .* the tokenizer of the shards"):
        run_eval(dataclasses.replace(options, adapter=str(other)))


@pytest.mark.slow
def test_accumulation_gives_the_same_adapter_as_one_bigger_batch(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    common = {"max_steps": 4, "learning_rate": 1e-2, "log_interval": 1}
    big = train(quick_config(train_shards, tiny_model_dir, tmp_path / "big", batch_size=4, **common))
    accumulated = quick_config(
        train_shards, tiny_model_dir, tmp_path / "acc", batch_size=2, accumulation_steps=2, **common
    )
    small = train(accumulated)
    assert max_adapter_difference(big.final_dir, small.final_dir) < 1e-5
    # Adam hides a constant factor in the gradient; the logged gradient norms do not.
    big_log, acc_log = (read_metrics(logs_dir(out, "hf_parallel_lora") / "metrics.jsonl") for out in (
        tmp_path / "big", tmp_path / "acc"))  # fmt: skip
    assert len(big_log) == 4
    assert [r["grad_norm"] for r in big_log] == pytest.approx([r["grad_norm"] for r in acc_log], rel=1e-5)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = quick_config(
        train_shards, tiny_model_dir, tmp_path / "out", learning_rate=1e30, grad_clip=0.0, save_interval=1
    )
    with pytest.raises(PloraError, match=r"loss is (nan|inf) at step 2; .*hf_parallel_lora_step1") as caught:
        train(cfg)
    assert "\n" not in str(caught.value)
    lora = tmp_path / "out" / "lora"
    assert sorted(p.name for p in lora.iterdir()) == ["hf_parallel_lora_step1"]


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, before any training step
# ---------------------------------------------------------------------------------------------------


def _tokenizer_with_an_extra_token(model_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(str(out))
    return out


def _model_without_rope(model_dir: Path, out: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=2000, n_embd=32, n_layer=1, n_head=2, n_positions=512)
    return _save_with_tiny_tokenizer(GPT2LMHeadModel(config), model_dir, out)


def _model_with_a_smaller_vocabulary(model_dir: Path, out: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return _save_with_tiny_tokenizer(Qwen2ForCausalLM(config), model_dir, out)


def _save_with_tiny_tokenizer(model: object, model_dir: Path, out: Path) -> Path:
    """A random model next to the tiny model's tokenizer files (the shards' tokenizer, so it passes)."""
    model.save_pretrained(str(out))  # type: ignore[attr-defined]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    return out


def _corrupt_copy(shards: Path, out: Path) -> Path:
    shutil.copytree(shards, out)
    victim = out / "shard-00001.arrow"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return out


BAD_CASES = {
    "missing shards": (lambda s, m, t: {"shards": str(t / "nowhere")}, "no such shard directory"),
    "mismatched tokenizer": (
        lambda s, m, t: {"tokenizer_path": str(_tokenizer_with_an_extra_token(m, t / "tok"))},
        "recorded tokenizer .* but the tokenizer given is",
    ),
    "corrupt shard": (
        lambda s, m, t: {"shards": str(_corrupt_copy(s, t / "corrupt"))},
        "sha256 does not match",
    ),
    "model without rope": (
        lambda s, m, t: {"base_model": str(_model_without_rope(m, t / "gpt2"))},
        "no rotary embedding",
    ),
    "model vocabulary too small": (
        lambda s, m, t: {"base_model": str(_model_with_a_smaller_vocabulary(m, t / "small"))},
        "the model embeds 1000 token ids, but the shards' tokenizer has 2000",
    ),
    "impossible ratio": (lambda s, m, t: {"rope_2d_ratio": 1.5}, r"--rope-2d-ratio must lie in \[0, 1\]"),
    "impossible stride": (lambda s, m, t: {"stride": 0}, "--stride must be a positive integer"),
    "negative save time": (lambda s, m, t: {"save_every_minutes": -1.0}, "--save-every-minutes must be >= 0"),
    "no dist timeout": (
        lambda s, m, t: {"dist_timeout_minutes": 0.0},
        "--dist-timeout-minutes must be positive",
    ),
    "pair out of range": (lambda s, m, t: {"pair_indices": [3, 9]}, "pair_indices must lie in 1..8"),
    "unwritable out_dir": (
        lambda s, m, t: {"out_dir": str(_a_file(t / "occupied"))},
        "cannot write checkpoints there",
    ),
    "resume from nothing": (lambda s, m, t: {"resume": str(t)}, "not a plora checkpoint directory"),
}


def _a_file(path: Path) -> Path:
    path.write_text("a file where a directory should be\n")
    return path


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_fails_in_one_line_before_training(
    case: str, train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    make, message = BAD_CASES[case]
    overrides = make(train_shards, tiny_model_dir, tmp_path)
    settings = {"shards": train_shards, "base_model": tiny_model_dir, "out_dir": tmp_path / "out"}
    settings["max_steps"] = 2
    cfg = quick_config(**{**settings, **overrides})
    with pytest.raises(PloraError, match=message) as caught:
        train(cfg)
    assert "\n" not in str(caught.value)
    out_dir = Path(cfg.out_dir)
    assert not (out_dir.is_dir() and (out_dir / "lora").is_dir() and any((out_dir / "lora").iterdir()))
    assert not (out_dir.is_dir() and (out_dir / "logs").exists() and any((out_dir / "logs").rglob("*.jsonl")))


def test_continuing_an_adapter_with_other_rope_settings_is_refused(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    first = train(quick_config(train_shards, tiny_model_dir, tmp_path / "a", max_steps=1))
    with pytest.raises(PloraError, match="trained with 2D RoPE pairs"):
        train(quick_config(train_shards, tiny_model_dir, tmp_path / "b", load_lora=str(first.final_dir),
                           rope_2d_ratio=0.25, max_steps=1))  # fmt: skip
    with pytest.raises(PloraError, match="seed was 42, now 7"):
        train(quick_config(train_shards, tiny_model_dir, tmp_path / "a", resume=str(first.final_dir), seed=7))
    with pytest.raises(PloraError, match="trained with --mask isolated, but this run uses --mask columnar"):
        train(quick_config(train_shards, tiny_model_dir, tmp_path / "b", load_lora=str(first.final_dir),
                           mask="columnar", max_steps=1))  # fmt: skip
    # An adapter trained on another vocabulary's ids.
    other = Path(shutil.copytree(first.final_dir, tmp_path / "other-vocabulary"))
    meta = json.loads((other / "plora.json").read_text())
    meta["tokenizer"]["vocab_sha256"] = "0" * 64
    (other / "plora.json").write_text(json.dumps(meta))
    with pytest.raises(PloraError, match=r"^adapter .*other-vocabulary: recorded tokenizer .* the shards in"):
        train(quick_config(train_shards, tiny_model_dir, tmp_path / "c", load_lora=str(other), max_steps=1))


@pytest.mark.parametrize(
    ("steps", "agree"), [((0, 0), True), ((4, 4), True), ((4, 0), False), ((3, 5), False)]
)
def test_processes_that_found_different_checkpoints_stop(
    monkeypatch, steps: tuple[int, int], agree: bool
) -> None:
    """Each process finds --resume's checkpoint on its own disk; they must all start at the same step."""
    import trainer.loop

    def all_sum_over_two(values: list[float], env: DistEnv) -> list[float]:
        other = [float(steps[1]), float(steps[1]) ** 2]
        return [a + b for a, b in zip(values, other, strict=True)]

    monkeypatch.setattr(trainer.loop, "all_sum", all_sum_over_two)
    env = DistEnv(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    if agree:
        trainer.loop._check_same_start(env, steps[0], None)
    else:
        with pytest.raises(PloraError, match="processes found different checkpoints.*shared storage"):
            trainer.loop._check_same_start(env, steps[0], None)
