"""The training loop, read top to bottom: ``train`` -> ``open_data`` -> ``setup`` -> ``train_loop``.

    open_data   shards (verified, tokenizer checked) -> exact plan -> the checkpoint to resume, checked
    setup       base model -> 2D RoPE -> LoRA -> DDP/FSDP -> optimizer (resumed) -> metrics log: a
                :class:`Run`
    train_step  accumulate micro-batches (DDP/FSDP sync only on the last), loss = summed CE / trained
                tokens of the whole global batch, clip, set the LR, optimizer step
    train_loop  step, log, validate every eval_interval, save every save_interval (and every
                save_every_minutes), stop resumably on SIGINT/SIGTERM, and the final adapter at the end

A non-finite loss stops the run before its update is applied; checkpoints already written stay.
"""

from __future__ import annotations

import datetime
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parallel.adaptermeta import PLORA_JSON, AdapterMeta
from parallel.errors import PloraError, Stopped
from parallel.fingerprint import plora_version
from parallel.loading import check_adapter_fits, model_facts
from parallel.pretrained import resolve_pretrained
from pipeline.shards import Manifest
from trainer.batches import Prefetcher, StepBatch, StepSchedule
from trainer.checkpoint import (
    RunIdentity,
    TrainerState,
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
from trainer.data import DataPlan, RowStore, make_plan, open_checked_shards, validation_batches
from trainer.distributed import (
    DistEnv,
    all_sum,
    gradient_sync,
    init_distributed,
    shorten_timeout,
    shutdown,
    wait_for_all,
    wrap,
)
from trainer.evaluate import autocast, evaluate_rows, join_validation
from trainer.fsdp import gather_checkpoint, load_base_for_sharding
from trainer.metrics import MetricsLog, epochs_text, new_run_id
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
from trainer.stop import graceful_stops


@dataclass
class TrainResult:
    final_dir: Path
    steps: int
    first_loss: float  # the whole run's first step, also after a resume
    last_loss: float
    val_loss: float | None
    tokens: int  # tokens this invocation trained on (a resumed run's earlier tokens are not in `seconds`)
    seconds: float
    data_seconds: float  # time steps waited for their batch: collation the prefetch did not hide
    epochs: float  # passes over the training rows the whole run makes


@dataclass(frozen=True)
class RunData:
    """What ``open_data`` found: the shards' rows and plan, and the checkpoint this run continues."""

    manifest: Manifest
    store: RowStore
    plan: DataPlan
    identity: RunIdentity  # what a resumed run must share with its checkpoint
    resume_dir: Path | None
    resumed: TrainerState | None  # its trainer state


@dataclass
class Run:
    """A set-up run: what ``setup`` built, and the counters the loop advances."""

    cfg: TrainConfig
    env: DistEnv
    store: RowStore
    plan: DataPlan
    schedule: StepSchedule
    model: torch.nn.Module  # the PEFT model: its adapter is what a checkpoint saves
    loss_module: PackedLoss  # validation runs it directly
    step_module: torch.nn.Module  # loss_module, in DDP under torchrun
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    identity: RunIdentity
    plora_meta: AdapterMeta
    run_id: str
    metrics: MetricsLog
    start_step: int
    resume_dir: Path | None
    first_loss: float  # the whole run's first step, also after a resume
    last_loss: float = float("nan")
    val_loss: float | None = None
    tokens_seen: int = 0  # the whole run's, also before a resume
    tokens_before: int = 0  # of tokens_seen, those before this invocation
    last_saved: Path | None = None  # the last good checkpoint, named when the loss goes non-finite


@dataclass(frozen=True)
class StepStats:
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # of the global batch
    trained: int  # trained tokens of the global batch


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
            data = open_data(cfg, env)
            if data.resumed is not None and data.resumed.step >= data.plan.total_steps:
                return _already_finished(cfg, env, data)
            run = setup(cfg, env, data, clear_replaced_run)
            try:
                return train_loop(run)
            finally:
                run.metrics.close()
    finally:
        shutdown(env)


def train_loop(run: Run) -> TrainResult:
    """Step, log, validate, save; stop early and resumably on SIGINT/SIGTERM; the final adapter last."""
    cfg, env, total = run.cfg, run.env, run.plan.total_steps
    eval_every = cfg.eval_interval or cfg.save_interval
    started = time.perf_counter()
    saved_at = time.monotonic()
    run.metrics.start(total, run.start_step)
    with (
        graceful_stops() as stop,
        Prefetcher(
            run.store,
            run.schedule,
            run.start_step,
            total,
            env.device,
            padding_free=run.loss_module.padding_free,
        ) as data,
    ):
        for batch in data:
            stats = train_step(run, batch)
            done = batch.step + 1
            _record(run, done, stats)
            if done == run.start_step + 1:  # startup is over: from now on a hang fails in minutes
                shorten_timeout(env, datetime.timedelta(minutes=cfg.dist_timeout_minutes))
            time_to_save = 0 < cfg.save_every_minutes * 60 <= time.monotonic() - saved_at
            stopping, time_to_save = _agree(env, stop.signum is not None, time_to_save)
            stopping = stopping and done < total  # a stop in the last step just finishes the run
            # A stopping run saves at once: torchrun kills its workers --shutdown-timeout (30 s) after
            # passing the signal on, so validation must not stand between the stop and the checkpoint.
            if len(run.plan.val_rows) and (done % eval_every == 0 or done == total) and not stopping:
                _validate(run, done)
            if done < total and (stopping or time_to_save or done % cfg.save_interval == 0):
                _save(run, step_checkpoint(cfg.out_dir, cfg.lora_name, done), done)
                saved_at = time.monotonic()
            if stopping:
                wait_for_all(env)  # no process exits before rank 0 has saved: torchrun would stop it
                raise _stopped(run, stop.signum, done)
        seconds = time.perf_counter() - started
        _save(run, final_checkpoint(cfg.out_dir, cfg.lora_name), total)
    wait_for_all(env)
    result = _result(run, seconds, data.wait_seconds)
    run.metrics.summary(result)
    return result


def train_step(run: Run, batch: StepBatch) -> StepStats:
    """One optimizer step: accumulate the micro-batches (DDP syncs only on the last), loss = summed CE /
    trained tokens of the whole global batch, clip, set the learning rate, step."""
    cfg, env = run.cfg, run.env
    torch.manual_seed(step_seed(cfg.seed, batch.step, env.rank))
    divisor = max(batch.trained, 1)  # every process knows the whole global batch: no communication
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    for micro, inputs in enumerate(batch.micro):
        with gradient_sync(run.step_module, sync=micro == batch.count - 1):
            with autocast(env.device, cfg.dtype):
                micro_loss = run.step_module(*inputs.loss_inputs)
            # DDP averages gradients over processes; scale by world_size so they add up instead.
            run.scaler.scale(micro_loss * (env.world_size / divisor)).backward()
        loss_sum += micro_loss.detach().double()
    loss = all_sum([float(loss_sum)], env)[0] / divisor
    if not math.isfinite(loss):
        where = (
            f"the last good checkpoint is {run.last_saved}" if run.last_saved else "no checkpoint was written"
        )
        raise PloraError(
            f"loss is {loss} at step {batch.step + 1}; stopped without applying that update ({where}); "
            "try a lower --learning-rate, --grad-clip, or --dtype bfloat16/float32"
        )
    run.scaler.unscale_(run.optimizer)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
    lr = lr_at(batch.step, cfg, run.plan.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return StepStats(loss=loss, lr=lr, grad_norm=grad_norm, tokens=batch.tokens, trained=batch.trained)


def open_data(cfg: TrainConfig, env: DistEnv) -> RunData:
    """Shards (verified, tokenizer checked), the exact plan, and the checkpoint to resume, checked
    against this run: every check that needs no model, before the model loads."""
    if env.is_main:
        check_writable(cfg.out_dir)
        remove_stale_temporaries(cfg.out_dir, cfg.lora_name)
    # One process per node reads every byte to check the checksums; its siblings read the same files.
    shards = open_checked_shards(cfg.shards, cfg.tokenizer_path or cfg.base_model, verify=env.local_rank == 0)
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
    identity = RunIdentity(
        seed=cfg.seed,
        group_by_length=cfg.group_by_length,
        val_fraction=cfg.val_fraction,
        global_batch=plan.global_batch,
        shards_digest=shards.manifest.digest,
        total_steps=plan.total_steps,
    )
    resume_dir = resolve_resume(cfg, env)
    resumed = read_trainer_state(resume_dir) if resume_dir is not None else None
    _check_same_start(env, resumed.step if resumed is not None else 0, resume_dir)
    if resume_dir is not None and resumed is not None:
        identity.check_resumes(resumed.identity, resume_dir)
    return RunData(shards.manifest, store, plan, identity, resume_dir, resumed)


def _check_same_start(env: DistEnv, step: int, resume_dir: Path | None) -> None:
    """Every process must start from the same step: each finds --resume's checkpoint on its own disk, and
    a node without the out-dir's storage would start afresh while the others resume (diverging weights,
    then a hang). Sum and sum of squares agree only when every step is the same."""
    total, squares = all_sum([float(step), float(step) ** 2], env)
    if total * total != squares * env.world_size:
        found = f"{resume_dir} (step {step})" if resume_dir is not None else "no checkpoint"
        raise PloraError(
            f"--resume: the processes found different checkpoints (process {env.rank}: {found}); "
            "every node must see the same --out-dir (shared storage)"
        )


def setup(cfg: TrainConfig, env: DistEnv, data: RunData, clear_replaced_run: Callable[[], None]) -> Run:
    """Base model, 2D RoPE, LoRA (fresh, continued or resumed), DDP, optimizer; then, every check passed,
    the earlier run --overwrite replaces is removed and the metrics log opens."""
    manifest, resumed, resume_dir = data.manifest, data.resumed, data.resume_dir
    torch.manual_seed(cfg.seed)  # fresh LoRA weights are the same in every process and every run
    sharded_base = load_base_for_sharding(cfg, env) if cfg.fsdp else None  # rank 0 alone reads the weights
    base, rope = load_rope_model(
        cfg, manifest.tokenizer["vocab_size"], data.store.max_coordinates, env.device, sharded_base
    )
    adapter_source = str(resume_dir) if resume_dir is not None else cfg.load_lora
    if adapter_source is not None:
        _check_adapter(adapter_source, base, rope, manifest, cfg)
    model = add_lora(base, cfg, adapter_source)
    model.train()
    loss_module = PackedLoss(model, mask=cfg.mask, stride=rope.stride)
    step_module = wrap(loss_module, model, env, fsdp=cfg.fsdp)  # on the device: DDP, FSDP2 or itself
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.dtype == "float16")
    if resume_dir is not None and resumed is not None:
        load_optimizer(resume_dir, optimizer, resumed)
        if resumed.scaler:
            scaler.load_state_dict(resumed.scaler)
    start_step = resumed.step if resumed is not None else 0
    run_id = resumed.run_id if resumed is not None else new_run_id()  # it keeps its TensorBoard directory
    clear_replaced_run()  # every check has passed: only now may --overwrite remove the earlier run
    if env.is_main:
        save_run_config(cfg)
    metrics = MetricsLog(cfg, enabled=env.is_main, start_step=start_step, run_id=run_id)
    schedule = StepSchedule(
        data.plan, data.store, seed=cfg.seed, group_by_length=cfg.group_by_length, rank=env.rank
    )
    tokens_seen = resumed.tokens_seen if resumed is not None else 0
    run = Run(
        cfg=cfg,
        env=env,
        store=data.store,
        plan=data.plan,
        schedule=schedule,
        model=model,
        loss_module=loss_module,
        step_module=step_module,
        params=params,
        optimizer=optimizer,
        scaler=scaler,
        identity=data.identity,
        plora_meta=_plora_metadata(cfg, rope, manifest, base, lora_settings(model)),
        run_id=run_id,
        metrics=metrics,
        start_step=start_step,
        resume_dir=resume_dir,
        first_loss=resumed.first_loss if resumed is not None else float("nan"),
        tokens_seen=tokens_seen,
        tokens_before=tokens_seen,
        last_saved=resume_dir,
    )
    _announce(run)
    return run


def _announce(run: Run) -> None:
    if not run.env.is_main:
        return
    cfg, plan, sizes = run.cfg, run.plan, count_parameters(run.model)
    run.metrics.announce(
        f"{len(plan.train_rows)} training rows ({len(plan.val_rows)} validation), global batch "
        f"{plan.global_batch} = {cfg.batch_size} x {run.env.world_size} process(es) "
        f"x {cfg.accumulation_steps} accumulation, "
        f"{plan.total_steps} steps ({epochs_text(plan.epochs_run)} of {plan.steps_per_epoch} steps); "
        f"{sizes['trainable']:,} of {sizes['total']:,} parameters trainable"
        + (f"; resuming at step {run.start_step} from {run.resume_dir}" if run.resume_dir else "")
    )


def _record(run: Run, done: int, stats: StepStats) -> None:
    run.tokens_seen += stats.tokens
    run.first_loss = stats.loss if math.isnan(run.first_loss) else run.first_loss
    run.last_loss = stats.loss
    run.metrics.step(
        done,
        loss=stats.loss,
        lr=stats.lr,
        grad_norm=stats.grad_norm,
        tokens=stats.tokens,
        trained=stats.trained,
    )


def _agree(env: DistEnv, stop: bool, time_to_save: bool) -> tuple[bool, bool]:
    """Every process stops at the same step if any of them was signalled, and saves when rank 0's clock
    says so (clocks differ between processes; one decides)."""
    stops, saves = all_sum([float(stop), float(time_to_save and env.is_main)], env)
    return stops > 0, saves > 0


def _save(run: Run, path: Path, done: int) -> None:
    """Checkpoint after update ``done``, written by rank 0; step checkpoints beyond the limit go."""
    tensors = gather_checkpoint(run.step_module, run.model, run.optimizer)  # every rank: FSDP gathers
    if run.env.is_main:
        losses = (run.first_loss, run.last_loss)
        state = _trainer_state(
            done, run.plan, run.identity, run.tokens_seen, run.scaler, run.cfg, run.run_id, losses
        )
        meta = replace(run.plora_meta, step=done)
        save_checkpoint(path, model=run.model, plora_meta=meta, state=state, tensors=tensors)
        if done < run.plan.total_steps:
            prune_checkpoints(
                run.cfg.out_dir, run.cfg.lora_name, run.cfg.save_total_limit, keep=run.resume_dir
            )
    run.last_saved = path


def _stopped(run: Run, signum: int | None, done: int) -> Stopped:
    """What every process raises; rank 0, which wrote the checkpoint, also says how to go on. A process
    stopped because another one was signalled reports SIGTERM, as torchrun's own stop would."""
    message = f"at step {done}"
    if run.env.is_main:
        message += f": saved {run.last_saved}; to continue, run the same command with --resume latest"
    return Stopped(signum or signal.SIGTERM, message)


def _result(run: Run, seconds: float, data_seconds: float) -> TrainResult:
    return TrainResult(
        final_checkpoint(run.cfg.out_dir, run.cfg.lora_name),
        run.plan.total_steps,
        run.first_loss,
        run.last_loss,
        run.val_loss,
        run.tokens_seen - run.tokens_before,
        seconds,
        data_seconds,
        run.plan.epochs_run,
    )


def _already_finished(cfg: TrainConfig, env: DistEnv, data: RunData) -> TrainResult:
    """Resuming a run that already made its last step: nothing to train and nothing rewritten."""
    assert data.resumed is not None and data.resume_dir is not None
    resumed, plan = data.resumed, data.plan
    final = final_checkpoint(cfg.out_dir, cfg.lora_name)
    adapter = final if final.is_dir() else data.resume_dir
    _say(
        env,
        f"plora train: nothing to do: the run already finished at step {resumed.step} "
        f"(this run has {plan.total_steps} steps); the final adapter is {adapter}",
    )
    return TrainResult(
        adapter,
        resumed.step,
        resumed.first_loss,
        resumed.last_loss,
        None,
        0,
        0.0,
        0.0,
        plan.epochs_run,
    )


def _validate(run: Run, done: int) -> None:
    env = run.env
    batches = validation_batches(run.plan, env.rank)
    totals = evaluate_rows(run.loss_module, run.store, batches, device=env.device, dtype=run.cfg.dtype)
    join_validation(run.loss_module, run.store, run.plan, env.rank, env.device, run.cfg.dtype)  # FSDP
    loss_sum, tokens = all_sum([totals.loss_sum, float(totals.tokens)], env)
    run.val_loss = loss_sum / tokens if tokens else float("nan")
    run.metrics.validation(done, run.val_loss)


def _check_adapter(
    adapter_dir: str, base: torch.nn.Module, rope: RopeSettings, manifest: Manifest, cfg: TrainConfig
) -> None:
    """An adapter continues only on its own base model, token ids and positions."""
    path = Path(adapter_dir)
    if not (path / PLORA_JSON).is_file():
        return  # a plain PEFT adapter: nothing recorded to compare
    config = AdapterMeta.read(path)
    against = f"the tokenizer of the shards in {cfg.shards}"
    check_adapter_fits(config, base, manifest.tokenizer, base=cfg.base_model, against=against)
    have = list(rope.rope.pair_indices) if rope.rope is not None else []
    if list(config.pair_indices) != have or config.stride != rope.stride:
        raise PloraError(
            f"{adapter_dir}: trained with 2D RoPE pairs {list(config.pair_indices)} and stride "
            f"{config.stride}, but this run uses pairs {have} and stride {rope.stride}; "
            "pass the same --rope-2d-ratio/--stride"
        )
    if config.mask != cfg.mask:  # its plora.json would name one mask for an adapter trained under two
        raise PloraError(
            f"{adapter_dir}: trained with --mask {config.mask}, but this run uses --mask {cfg.mask}; "
            f"pass --mask {config.mask}"
        )


def _plora_metadata(
    cfg: TrainConfig,
    rope: RopeSettings,
    manifest: Manifest,
    base: torch.nn.Module,
    lora: dict[str, Any],
) -> AdapterMeta:
    """plora.json (of step 0: each checkpoint sets its own): everything inference needs to rebuild
    the exact model and inputs, and the facts a base model given at load time is checked against."""
    return AdapterMeta(
        plora_version=plora_version(),
        # Absolute for a local directory (the adapter may be loaded from another working directory).
        base_model=resolve_pretrained(cfg.base_model, what="base model").name,
        model=model_facts(base),
        tokenizer=manifest.tokenizer,
        special_tokens=manifest.special_tokens,
        patch_rope=rope.rope is not None,
        rope_2d_ratio=rope.rope.ratio if rope.rope is not None else 0.0,
        pair_indices=tuple(rope.rope.pair_indices) if rope.rope is not None else (),
        num_pairs=rope.rope.num_pairs if rope.rope is not None else None,
        stride=rope.stride,
        mask=cfg.mask,
        align=manifest.packing["align"],
        packing=manifest.packing,
        attn=cfg.attn,
        dtype=cfg.dtype,
        lora=lora,
        shards={"directory": str(Path(cfg.shards).resolve()), "digest": manifest.digest},
        step=0,
    )


def _trainer_state(
    step: int,
    plan: DataPlan,
    run_identity: RunIdentity,
    tokens_seen: int,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    run_id: str,
    losses: tuple[float, float],
) -> TrainerState:
    epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
    return TrainerState(
        identity=run_identity,
        first_loss=losses[0],
        last_loss=losses[1],
        run_id=run_id,
        step=step,
        epoch=epoch,
        step_in_epoch=step_in_epoch,
        world_size=plan.world_size,
        tokens_seen=tokens_seen,
        scaler=scaler.state_dict(),
        config=cfg.to_json(),
    )
