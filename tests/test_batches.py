"""The prefetch changes when a micro-batch is collated, never which rows it holds: made one ahead in a
background thread (as on CUDA) or when taken (as on the CPU), every step gets the batches that collating
its rows directly gives, also from a step in the middle of a run (a resume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.shards import open_shards
from trainer.batches import Prefetcher, StepSchedule
from trainer.data import Batch, RowStore, epoch_order, make_plan, micro_batches, step_rows

CPU = torch.device("cpu")


def _taken(prefetcher: Prefetcher) -> list[tuple[int, int, int, list[Batch]]]:
    with prefetcher:
        return [(b.step, b.tokens, b.trained, list(b.micro)) for b in prefetcher]


@pytest.mark.parametrize("padding_free", [False, True])
def test_prefetched_steps_hold_the_rows_of_the_plan(train_shards: Path, padding_free: bool) -> None:
    store = RowStore(open_shards(train_shards))
    # Two processes, accumulation 2, 2 epochs; 12k + 1 training rows, so the last step of each epoch has one
    # row and empty micro-batches (weightless rows).
    held_out = (len(store) - 1) % 12 or 12
    sizes = {"batch_size": 3, "world_size": 2, "accumulation_steps": 2, "epochs": 2, "max_steps": 0}
    plan = make_plan(len(store), val_fraction=held_out / len(store), seed=5, **sizes)
    assert len(plan.train_rows) % plan.global_batch == 1
    for rank in range(2):
        schedule = StepSchedule(plan, store, seed=5, group_by_length=True, rank=rank)
        expected = []
        for step in range(plan.total_steps):
            epoch, in_epoch = divmod(step, plan.steps_per_epoch)
            rows = step_rows(epoch_order(plan, epoch, 5, store.num_tokens, True), plan, in_epoch)
            parts = micro_batches(rows, plan, rank)
            batches = [store.micro_batch(p, int(rows[0]), padding_free=padding_free) for p in parts]
            tokens = (int(store.num_tokens[rows].sum()), int(store.num_trained[rows].sum()))
            expected.append((step, *tokens, batches))
        for background in (True, False):
            options = {"padding_free": padding_free, "background": background}
            got = _taken(Prefetcher(store, schedule, 0, plan.total_steps, CPU, **options))
            resumed = _taken(Prefetcher(store, schedule, 3, plan.total_steps, CPU, **options))
            for taken in (got, [*got[:3], *resumed]):
                assert [t[:3] for t in taken] == [e[:3] for e in expected]
                for (*_, have), (*_, want) in zip(taken, expected, strict=True):
                    assert len(have) == len(want)
                    for a, b in zip(have, want, strict=True):
                        for name in Batch.__dataclass_fields__:
                            x, y = getattr(a, name), getattr(b, name)
                            assert (x is None and y is None) or torch.equal(x, y), name
    assert np.array_equal(
        schedule.rows(0).rows, step_rows(epoch_order(plan, 0, 5, store.num_tokens, True), plan, 0)
    )
