"""The batches of each optimizer step, in order, each micro-batch made ready while the one before trains.

The rows of a step are a function of (seed, epoch, step) (trainer.data), so the next micro-batch can be
collated ahead of time without changing what any step sees: the prefetch changes when a batch is made,
never which rows it holds, and exact resume holds as before. On CUDA one background thread collates
(numpy, no torch RNG) and pins the next micro-batch while the GPU runs the current one; the training
thread copies it with ``non_blocking=True``, so the copy is queued behind the running step instead of
stalling it. On the CPU the step itself keeps every core busy: a collating thread would only take
turns with it, so there a micro-batch is collated when it is taken, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from trainer.data import Batch, DataPlan, RowStore, epoch_order, micro_batches, step_rows


@dataclass(frozen=True)
class StepRows:
    step: int
    rows: np.ndarray  # the whole global batch, every process's rows
    parts: list[np.ndarray]  # this process's micro-batches; an empty one trains a weightless row
    tokens: int  # tokens of the global batch
    trained: int  # trained (labelled) tokens of the global batch: the loss's divisor on every process


class StepSchedule:
    """Which rows each step trains; every process computes the whole global batch without talking."""

    def __init__(self, plan: DataPlan, store: RowStore, *, seed: int, group_by_length: bool, rank: int):
        self.plan = plan
        self.store = store
        self.seed = seed
        self.group_by_length = group_by_length
        self.rank = rank
        self._orders: dict[int, np.ndarray] = {}

    def rows(self, step: int) -> StepRows:
        epoch, step_in_epoch = divmod(step, self.plan.steps_per_epoch)
        if epoch not in self._orders:  # the prefetch may be one epoch ahead of the step: keep two
            lengths = self.store.num_tokens
            order = epoch_order(self.plan, epoch, self.seed, lengths, self.group_by_length)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1} | {epoch: order}
        rows = step_rows(self._orders[epoch], self.plan, step_in_epoch)
        return StepRows(
            step,
            rows,
            micro_batches(rows, self.plan, self.rank),
            int(self.store.num_tokens[rows].sum()),
            int(self.store.num_trained[rows].sum()),
        )


@dataclass(frozen=True)
class StepBatch:
    step: int
    tokens: int
    trained: int
    count: int  # micro-batches in this step (DDP synchronises gradients on the last)
    micro: Iterator[Batch]  # on the device; each taken starts the collation of the next


class Prefetcher:
    """Steps ``start .. total-1`` as :class:`StepBatch`; with ``background`` (the default on CUDA)
    their micro-batches are collated one ahead in a thread."""

    def __init__(
        self,
        store: RowStore,
        schedule: StepSchedule,
        start: int,
        total: int,
        device: torch.device,
        *,
        padding_free: bool,
        background: bool | None = None,
    ):
        self.store, self.schedule, self.start, self.total, self.device = store, schedule, start, total, device
        self.padding_free = padding_free  # rows end to end (prefix and flex attention), else padded rows
        self.wait_seconds = 0.0  # time the training thread waited for a batch: collation not hidden
        background = device.type == "cuda" if background is None else background
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="plora-collate") if background else None
        self._jobs = self._parts()
        self._next = self._submit()

    def __iter__(self) -> Iterator[StepBatch]:
        for step in range(self.start, self.total):
            rows = self.schedule.rows(step)
            micro = (self._take() for _ in rows.parts)
            yield StepBatch(step, rows.tokens, rows.trained, len(rows.parts), micro)

    def _parts(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(global batch, this process's micro-batch rows) of every micro-batch, in training order."""
        for step in range(self.start, self.total):
            rows = self.schedule.rows(step)
            for part in rows.parts:
                yield rows.rows, part

    def _submit(self) -> Callable[[], Batch] | None:
        """The next micro-batch, being made in the background (or, without one, made when called)."""
        job = next(self._jobs, None)
        if job is None:
            return None
        return self._pool.submit(self._collate, *job).result if self._pool else partial(self._collate, *job)

    def _collate(self, global_rows: np.ndarray, part: np.ndarray) -> Batch:
        batch = self.store.micro_batch(part, int(global_rows[0]), padding_free=self.padding_free)
        return batch.pinned() if self.device.type == "cuda" else batch

    def _take(self) -> Batch:
        tick = time.perf_counter()
        assert self._next is not None, "more micro-batches taken than the schedule holds"
        ready = self._next()
        self._next = self._submit()
        batch = ready.to(self.device)
        self.wait_seconds += time.perf_counter() - tick
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
