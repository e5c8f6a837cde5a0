"""The training loop: one function, read top to bottom.

    setup   shards (verified, tokenizer checked) -> exact plan -> base model -> 2D RoPE -> LoRA -> DDP/FSDP
    step    accumulate micro-batches (DDP syncs only on the last), loss = summed CE / trained tokens of the
            whole global batch, clip, set the LR, optimizer step
    then    log, validate every eval_interval, save every save_interval, and the final adapter at the end

A non-finite loss stops the run before its update is applied; checkpoints already written stay.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parallel.errors import PloraError
from parallel.fingerprint import plora_version
from parallel.loading import AdapterConfig, check_adapter_fits, model_facts
from parallel.pretrained import resolve_pretrained
from trainer.checkpoint import (
    check_writable,
    final_checkpoint,
    latest_checkpoint,
    load_optimizer,
    lora_dir,
    read_trainer_state,
    remove_stale_temporaries,
    save_checkpoint,
    step_checkpoint,
)
from trainer.config import TrainConfig
from trainer.configfile import save_run_config
from trainer.data import (
    DataPlan,
    RowStore,
    epoch_order,
    make_plan,
    micro_batches,
    open_checked_shards,
    step_rows,
    validation_batches,
)
from trainer.distributed import (
    DistEnv,
    all_sum,
    gradient_sync,
    init_distributed,
    shutdown,
    wait_for_all,
    wrap,
)
from trainer.evaluate import autocast, evaluate_rows, join_validation
from trainer.fsdp import gather_checkpoint
from trainer.metrics import MetricsLog, epochs_text, first_logged_loss, new_run_id
from trainer.model import (
    PackedLoss,
    RopeSettings,
    add_lora,
    count_parameters,
    load_rope_model,
    lora_settings,
    trainable_parameters,
)
from trainer.rundir import claimed_out_dir, prune_checkpoints

# Settings a resumed run must share with the checkpoint, or its data order and batches would differ
# (and, for the run's length, its learning-rate schedule and where it ends).
RESUME_MUST_MATCH: tuple[str, ...] = (
    "seed",
    "group_by_length",
    "val_fraction",
    "global_batch",
    "shards_digest",
    "total_steps",
)


@dataclass
class TrainResult:
    final_dir: Path
    steps: int
    first_loss: float  # the whole run's first step, also after a resume
    last_loss: float
    val_loss: float | None
    tokens: int  # tokens this invocation trained on (a resumed run's earlier tokens are not in `seconds`)
    seconds: float
    data_seconds: float  # collation and host-to-device copies
    epochs: float  # passes over the training rows the whole run makes


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine/linear decay to min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.learning_rate * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.learning_rate
    progress = min(1.0, (step - cfg.warmup) / max(1, total_steps - cfg.warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of torch's RNG (LoRA dropout) for one step of one process: resuming needs no saved RNG state."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def resolve_resume(cfg: TrainConfig, env: DistEnv) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":  # the newest checkpoint if there is one, else a fresh start (restart scripts)
        found = latest_checkpoint(cfg.out_dir, cfg.lora_name)
        if found is None:
            _say(
                env,
                f"--resume latest: no checkpoint of {cfg.lora_name} in {lora_dir(cfg.out_dir)}; "
                "nothing to resume, starting a fresh run",
            )
        return found
    return Path(cfg.resume)


def _say(env: DistEnv, message: str) -> None:
    """One line on stderr from the main process, before the metrics log exists."""
    if env.is_main:
        print(message, file=sys.stderr, flush=True)


def train(cfg: TrainConfig) -> TrainResult:
    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        with claimed_out_dir(cfg, env.is_main) as clear_replaced_run:
            return _train(cfg, env, clear_replaced_run)
    finally:
        shutdown(env)


def _train(cfg: TrainConfig, env: DistEnv, clear_replaced_run: Callable[[], None]) -> TrainResult:
    # ---- setup: every check that can fail does so here, before the first step ----------------------
    if env.is_main:
        check_writable(cfg.out_dir)
        remove_stale_temporaries(cfg.out_dir, cfg.lora_name)
    # One process per node reads every byte to check the checksums; its siblings read the same files.
    shards = open_checked_shards(cfg.shards, cfg.tokenizer_path or cfg.base_model, verify=env.local_rank == 0)
    manifest = shards.manifest
    store = RowStore(shards)
    plan = make_plan(
        len(store),
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        world_size=env.world_size,
        accumulation_steps=cfg.accumulation_steps,
        epochs=cfg.epochs,
        max_steps=cfg.max_steps,
    )
    run_identity = {
        "seed": cfg.seed,
        "group_by_length": cfg.group_by_length,
        "val_fraction": cfg.val_fraction,
        "global_batch": plan.global_batch,
        "shards_digest": manifest["fingerprint"]["digest"],
        "total_steps": plan.total_steps,
    }
    resume_dir = resolve_resume(cfg, env)
    resumed = read_trainer_state(resume_dir) if resume_dir is not None else None
    if resumed is not None:
        for key in RESUME_MUST_MATCH:
            if resumed[key] != run_identity[key]:
                raise PloraError(
                    f"--resume {resume_dir}: {key} was {resumed[key]!r}, now {run_identity[key]!r}; "
                    "resume with the checkpoint's settings"
                )
        if resumed["step"] >= plan.total_steps:
            assert resume_dir is not None
            return _already_finished(cfg, env, plan, resume_dir, resumed)

    torch.manual_seed(cfg.seed)  # fresh LoRA weights are the same in every process and every run
    base, rope = load_rope_model(cfg, manifest["tokenizer"]["vocab_size"], store.max_coordinates, env.device)
    adapter_source = str(resume_dir) if resume_dir is not None else cfg.load_lora
    if adapter_source is not None:
        _check_adapter(adapter_source, base, rope, manifest, cfg)
    model = add_lora(base, cfg, adapter_source).to(env.device)
    model.train()
    loss_module = PackedLoss(model, mask=cfg.mask, stride=rope.stride)
    ddp_module = wrap(loss_module, model, env, fsdp=cfg.fsdp)  # DDP, FSDP2 or the module itself
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.dtype == "float16")
    start_step = 0
    if resume_dir is not None and resumed is not None:
        load_optimizer(resume_dir, optimizer, resumed)
        if resumed["scaler"]:
            scaler.load_state_dict(resumed["scaler"])
        start_step = resumed["step"]
    total_steps = plan.total_steps
    run_id = (resumed or {}).get("run_id") or new_run_id()  # a resumed run keeps its TensorBoard directory
    clear_replaced_run()  # every check has passed: only now may --overwrite remove the earlier run
    if env.is_main:
        save_run_config(cfg)
    metrics = MetricsLog(cfg, enabled=env.is_main, start_step=start_step, run_id=run_id)
    plora_meta = _plora_metadata(cfg, rope, manifest, base, lora_settings(model))
    if env.is_main:
        sizes = count_parameters(model)
        metrics.announce(
            f"{len(plan.train_rows)} training rows ({len(plan.val_rows)} validation), global batch "
            f"{plan.global_batch} = {cfg.batch_size} x {env.world_size} process(es) "
            f"x {cfg.accumulation_steps} accumulation, "
            f"{total_steps} steps ({epochs_text(plan.epochs_run)} of {plan.steps_per_epoch} steps); "
            f"{sizes['trainable']:,} of {sizes['total']:,} parameters trainable"
            + (f"; resuming at step {start_step} from {resume_dir}" if resumed else "")
        )

    # ---- training -------------------------------------------------------------------------------------
    order_epoch, order = -1, np.empty(0, dtype=np.int64)
    first_loss = _first_loss(resumed, cfg) if resumed else float("nan")
    last_loss = float("nan")
    val_loss: float | None = None
    last_saved: Path | None = resume_dir
    tokens_before = tokens_seen = resumed["tokens_seen"] if resumed else 0
    started, data_seconds = time.perf_counter(), 0.0
    metrics.start(total_steps, start_step)
    try:
        for step in range(start_step, total_steps):
            epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = (
                    epoch,
                    epoch_order(plan, epoch, cfg.seed, store.num_tokens, cfg.group_by_length),
                )
            global_rows = step_rows(order, plan, step_in_epoch)
            # Every process knows the whole global batch, so it knows the divisor without communicating.
            trained_tokens = int(store.num_trained[global_rows].sum())
            step_tokens = int(store.num_tokens[global_rows].sum())
            torch.manual_seed(step_seed(cfg.seed, step, env.rank))
            parts = micro_batches(global_rows, plan, env.rank)
            loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
            for micro, rows in enumerate(parts):
                tick = time.perf_counter()
                batch = store.collate(rows) if len(rows) else store.weightless(int(global_rows[0]))
                batch = batch.to(env.device)
                data_seconds += time.perf_counter() - tick
                last_micro = micro == len(parts) - 1
                with gradient_sync(ddp_module, last_micro):
                    with autocast(env.device, cfg.dtype):
                        micro_loss = ddp_module(
                            batch.input_ids,
                            batch.branch_id,
                            batch.time_id,
                            batch.attention_mask,
                            batch.labels,
                        )
                    # DDP averages gradients over processes; scale by world_size so they add up instead.
                    scaler.scale(micro_loss * (env.world_size / max(trained_tokens, 1))).backward()
                loss_sum += micro_loss.detach().double()
            loss = all_sum([float(loss_sum)], env)[0] / max(trained_tokens, 1)
            if not math.isfinite(loss):
                where = (
                    f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written"
                )
                raise PloraError(
                    f"loss is {loss} at step {step + 1}; stopped without applying that update ({where}); "
                    "try a lower --learning-rate, --grad-clip, or --dtype bfloat16/float32"
                )
            scaler.unscale_(optimizer)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            lr = lr_at(step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            tokens_seen += step_tokens
            first_loss = loss if math.isnan(first_loss) else first_loss
            last_loss = loss
            metrics.step(
                done, loss=loss, lr=lr, grad_norm=grad_norm, tokens=step_tokens, trained=trained_tokens
            )
            eval_every = cfg.eval_interval or cfg.save_interval
            if len(plan.val_rows) and (done % eval_every == 0 or done == total_steps):
                val_loss = _validate(loss_module, store, plan, env, cfg.dtype)
                metrics.validation(done, val_loss)
            if done % cfg.save_interval == 0 and done < total_steps:
                path = step_checkpoint(cfg.out_dir, cfg.lora_name, done)
                losses = {"first_loss": first_loss, "last_loss": last_loss}
                state = _trainer_state(done, plan, run_identity, tokens_seen, scaler, cfg, run_id, losses)
                tensors = gather_checkpoint(ddp_module, model, optimizer)  # every rank: FSDP gathers
                if env.is_main:
                    meta = {**plora_meta, "step": done}
                    save_checkpoint(path, model=model, plora_meta=meta, state=state, tensors=tensors)
                    prune_checkpoints(cfg.out_dir, cfg.lora_name, cfg.save_total_limit, keep=resume_dir)
                last_saved = path

        seconds = time.perf_counter() - started
        final = final_checkpoint(cfg.out_dir, cfg.lora_name)
        tensors = gather_checkpoint(ddp_module, model, optimizer)
        if env.is_main:
            losses = {"first_loss": first_loss, "last_loss": last_loss}
            state = _trainer_state(total_steps, plan, run_identity, tokens_seen, scaler, cfg, run_id, losses)
            meta = {**plora_meta, "step": total_steps}
            save_checkpoint(final, model=model, plora_meta=meta, state=state, tensors=tensors)
        wait_for_all(env)
    finally:
        metrics.close()
    result = TrainResult(
        final,
        total_steps,
        first_loss,
        last_loss,
        val_loss,
        tokens_seen - tokens_before,
        seconds,
        data_seconds,
        plan.epochs_run,
    )
    metrics.summary(result)
    return result


def _first_loss(resumed: dict[str, Any], cfg: TrainConfig) -> float:
    """The loss of the run's first step, so a resumed run's summary covers the whole run (checkpoints
    from before the state recorded it: the first loss in the run's metrics.jsonl)."""
    if "first_loss" in resumed:
        return float(resumed["first_loss"])
    return first_logged_loss(cfg.out_dir, cfg.lora_name)


def _already_finished(
    cfg: TrainConfig, env: DistEnv, plan: DataPlan, resume_dir: Path, resumed: dict[str, Any]
) -> TrainResult:
    """Resuming a run that already made its last step: nothing to train and nothing rewritten."""
    final = final_checkpoint(cfg.out_dir, cfg.lora_name)
    adapter = final if final.is_dir() else resume_dir
    _say(
        env,
        f"plora train: nothing to do: the run already finished at step {resumed['step']} "
        f"(this run has {plan.total_steps} steps); the final adapter is {adapter}",
    )
    nan = float("nan")
    return TrainResult(
        adapter,
        int(resumed["step"]),
        float(resumed.get("first_loss", nan)),
        float(resumed.get("last_loss", nan)),
        None,
        0,
        0.0,
        0.0,
        plan.epochs_run,
    )


def _validate(loss_module: PackedLoss, store: RowStore, plan: DataPlan, env: DistEnv, dtype: str) -> float:
    totals = evaluate_rows(
        loss_module, store, validation_batches(plan, env.rank), device=env.device, dtype=dtype
    )
    join_validation(loss_module, store, plan, env.rank, env.device, dtype)  # FSDP: match the other ranks
    loss_sum, tokens = all_sum([totals.loss_sum, float(totals.tokens)], env)
    return loss_sum / tokens if tokens else float("nan")


def _check_adapter(
    adapter_dir: str, base: torch.nn.Module, rope: RopeSettings, manifest: dict[str, Any], cfg: TrainConfig
) -> None:
    """An adapter continues only on its own base model, token ids and positions."""
    path = Path(adapter_dir)
    if not (path / "plora.json").is_file():
        return  # a plain PEFT adapter: nothing recorded to compare
    config = AdapterConfig.read(path)
    against = f"the tokenizer of the shards in {cfg.shards}"
    check_adapter_fits(config, base, manifest["tokenizer"], base=cfg.base_model, against=against)
    have = list(rope.rope.pair_indices) if rope.rope is not None else []
    if list(config.pair_indices) != have or config.stride != rope.stride:
        raise PloraError(
            f"{adapter_dir}: trained with 2D RoPE pairs {list(config.pair_indices)} and stride "
            f"{config.stride}, but this run uses pairs {have} and stride {rope.stride}; "
            "pass the same --rope-2d-ratio/--stride"
        )


def _plora_metadata(
    cfg: TrainConfig,
    rope: RopeSettings,
    manifest: dict[str, Any],
    base: torch.nn.Module,
    lora: dict[str, Any],
) -> dict[str, Any]:
    """plora.json: everything inference needs to rebuild the exact model and inputs, and the facts a
    base model given at load time is checked against."""
    return {
        "format_version": 1,
        "plora_version": plora_version(),
        # Absolute for a local directory (the adapter may be loaded from another working directory).
        "base_model": resolve_pretrained(cfg.base_model, what="base model").name,
        "model": model_facts(base),
        "tokenizer": manifest["tokenizer"],
        "special_tokens": manifest["special_tokens"],
        "patch_rope": rope.rope is not None,
        "rope_2d_ratio": rope.rope.ratio if rope.rope is not None else 0.0,
        "pair_indices": list(rope.rope.pair_indices) if rope.rope is not None else [],
        "num_pairs": rope.rope.num_pairs if rope.rope is not None else None,
        "stride": rope.stride,
        "mask": cfg.mask,
        "align": manifest["packing"]["align"],
        "packing": manifest["packing"],
        "attn": cfg.attn,
        "dtype": cfg.dtype,
        "lora": lora,
        "shards": {"directory": str(Path(cfg.shards).resolve()), "digest": manifest["fingerprint"]["digest"]},
    }


def _trainer_state(
    step: int,
    plan: DataPlan,
    run_identity: dict[str, Any],
    tokens_seen: int,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    run_id: str,
    losses: dict[str, float],
) -> dict[str, Any]:
    epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
    return {
        **run_identity,
        **losses,
        "run_id": run_id,
        "step": step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "world_size": plan.world_size,
        "tokens_seen": tokens_seen,
        "scaler": scaler.state_dict(),
        "config": cfg.to_json(),
    }
