"""Which rows each process trains on at each step, and how rows become padded tensors.

Order: one permutation of the training rows per epoch, drawn from ``seed + epoch``, so any step's rows are
known from (seed, epoch, step) alone; that is what makes ``--resume`` exact and lets every process agree
on the whole global batch without talking to the others.

Global batch: optimizer step ``s`` of an epoch trains rows ``order[s*G : (s+1)*G]`` with
``G = batch_size * world_size * accumulation_steps``. Those rows are cut into ``accumulation_steps *
world_size`` slices (micro-batches) of ``batch_size`` rows; process ``r`` takes slices ``m*W + r``. The last
step of an epoch may be short: it is cut into equal slices as far as it goes (sizes differ by at most
one) rather than dropped or padded with repeated rows, so every row is trained exactly once per epoch. A
process whose slice is empty still runs a forward/backward on a weightless row (all labels ignored), so
every process makes the same collective calls. Hence ``steps_per_epoch = ceil(rows / G)``, exactly.

Loss weights: the number of trained tokens of the whole global batch is computed from the shard
metadata by every process; each micro-batch's summed cross-entropy is divided by it. One process with
batch size ``W*b`` and W processes with batch size ``b`` therefore get the same gradient.

``group_by_length`` sorts the epoch's rows by length and cuts them into global batches (so each micro-batch
holds rows of similar length and padding stays small), then visits those batches in a seeded random order:
any stretch of steps, a short run's first ones included, sees rows from the whole range of lengths.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from parallel.errors import PloraError
from parallel.layout import IGNORE_INDEX, TOKEN_COLUMNS
from parallel.tokenizer import load_tokenizer
from pipeline.shards import ShardSet, flat_columns, open_shards

VALIDATION_SEED_OFFSET = 7919  # the validation split never depends on the training order's seed stream


@dataclass(frozen=True)
class Batch:
    """[B, L] tensors of a micro-batch's B rows, padded; or, padding-free, [1, N] with the rows end to end
    and ``row_id`` naming each token's row. ``labels`` are already the next token (-100: not trained)."""

    input_ids: torch.Tensor
    branch_id: torch.Tensor
    time_id: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    num_branches: torch.Tensor  # [B] branches per row (for per-branch-count evaluation)
    row_id: torch.Tensor | None = None  # [1, N] padding-free only

    def to(self, device: torch.device) -> Batch:
        return self._map(lambda v: v.to(device, non_blocking=True))

    def pinned(self) -> Batch:
        """In page-locked memory, so that a later copy to the GPU can overlap with compute."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return Batch(**{k: None if v is None else fn(v) for k, v in fields.items()})

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """``[B]``: the sum of a per-token tensor (shaped like the tokens) over each row's tokens."""
        if self.row_id is None:
            return values.sum(dim=1)
        sums = values.new_zeros(len(self.num_branches))
        return sums.index_add_(0, self.row_id.reshape(-1), values.reshape(-1))

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def loss_inputs(self) -> tuple[torch.Tensor | None, ...]:
        """The arguments of ``PackedLoss`` (its forward and ``token_losses``), in their order."""
        return self.input_ids, self.branch_id, self.time_id, self.attention_mask, self.labels, self.row_id


def open_checked_shards(shards: str, tokenizer_path: str, *, verify: bool) -> ShardSet:
    """A shard directory, refused unless it was tokenized by the tokenizer at ``tokenizer_path``."""
    shard_set = open_shards(shards, verify=verify)
    shard_set.check_tokenizer(load_tokenizer(tokenizer_path))
    return shard_set


class RowStore:
    """Vectorised access to the token columns of memory-mapped shards.

    Each shard file's list columns are held as flat numpy views (no copy) plus row offsets, so a batch is
    gathered with a handful of fancy-indexing operations per file, never a loop over tokens.
    """

    def __init__(self, shards: ShardSet) -> None:
        self.files = flat_columns(shards)
        rows_per_file = np.array([len(offsets) - 1 for offsets, _ in self.files], dtype=np.int64)
        self.file_starts = np.concatenate([[0], np.cumsum(rows_per_file)])
        meta = shards.metadata()
        self.num_tokens = np.asarray(meta["num_tokens"], dtype=np.int64)
        self.num_trained = np.asarray(meta["num_trained"], dtype=np.int64)
        self.num_branches = np.asarray(meta["num_branches"], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.file_starts[-1])

    @cached_property
    def max_coordinates(self) -> tuple[int, int]:
        """(largest branch_id, largest time_id) of any token: one pass over the flat columns."""
        branch = max((int(v["branch_id"].max()) for _, v in self.files if len(v["branch_id"])), default=0)
        time = max((int(v["time_id"].max()) for _, v in self.files if len(v["time_id"])), default=0)
        return branch, time

    def collate(self, rows: np.ndarray, *, padding_free: bool = False) -> Batch:
        """Pad the given rows to the longest of them: ids/coordinates 0, labels -100, attention_mask 0.

        ``padding_free``: lay them end to end in one sequence instead, with ``row_id`` (for attention
        that keeps rows apart without a dense mask: parallel.forward.packs_rows).
        """
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.num_tokens[rows]
        ends = np.cumsum(lengths)
        width = int(ends[-1]) if padding_free else int(lengths.max())
        # Where each row's first token goes in the flattened output.
        first = ends - lengths if padding_free else np.arange(len(rows)) * width
        shape = (1, width) if padding_free else (len(rows), width)
        out = {name: np.zeros(shape[0] * width, dtype=np.int64) for name in TOKEN_COLUMNS}
        out["labels"].fill(IGNORE_INDEX)
        file_of_row = np.searchsorted(self.file_starts, rows, side="right") - 1
        for file_index in np.unique(file_of_row):
            offsets, values = self.files[file_index]
            batch_pos = np.nonzero(file_of_row == file_index)[0]
            local = rows[batch_pos] - self.file_starts[file_index]
            starts = offsets[local].astype(np.int64)
            lens = offsets[local + 1].astype(np.int64) - starts
            # Token t of the concatenation is token col[t] of its row; it goes to dest[t].
            col = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
            dest = np.repeat(first[batch_pos], lens) + col
            source = np.repeat(starts, lens) + col
            for name in TOKEN_COLUMNS:
                out[name][dest] = values[name][source]
        if padding_free:
            attention_mask = np.ones(shape, dtype=np.int64)
            row_id = torch.from_numpy(np.repeat(np.arange(len(rows)), lengths)[None])
        else:
            attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
            row_id = None
        return Batch(
            **{name: torch.from_numpy(out[name].reshape(shape)) for name in TOKEN_COLUMNS},
            attention_mask=torch.from_numpy(attention_mask),
            num_branches=torch.from_numpy(self.num_branches[rows]),
            row_id=row_id,
        )

    def micro_batch(self, rows: np.ndarray, filler: int, *, padding_free: bool) -> Batch:
        """A process's micro-batch: its ``rows``, or where it has none, row ``filler`` weightless."""
        return self.collate(rows, padding_free=padding_free) if len(rows) else self.weightless(filler)

    def weightless(self, row: int) -> Batch:
        """One real row with every label ignored: a process with no rows left still joins the step."""
        batch = self.collate(np.array([row]))
        return Batch(**{**batch.__dict__, "labels": torch.full_like(batch.labels, IGNORE_INDEX)})


@dataclass(frozen=True)
class DataPlan:
    """The training/validation split and the exact step counts, derived from the manifest's rows."""

    train_rows: np.ndarray
    val_rows: np.ndarray
    batch_size: int
    world_size: int
    accumulation_steps: int
    epochs: int
    max_steps: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_rows) / self.global_batch)

    @property
    def total_steps(self) -> int:
        # As in HF's Trainer, --max-steps is the length of the run: it overrides --epochs either way,
        # cycling through further epochs (each in its own seeded order) when it asks for more.
        return self.max_steps if self.max_steps > 0 else self.epochs * self.steps_per_epoch

    @property
    def epochs_run(self) -> float:
        """How many passes over the training rows ``total_steps`` makes (fractional under --max-steps)."""
        return self.total_steps / self.steps_per_epoch


def make_plan(
    num_rows: int,
    *,
    val_fraction: float,
    seed: int,
    batch_size: int,
    world_size: int,
    accumulation_steps: int,
    epochs: int,
    max_steps: int,
) -> DataPlan:
    """Split rows into training and validation, then count the steps."""
    train_rows, val_rows = split_rows(num_rows, val_fraction=val_fraction, seed=seed)
    return DataPlan(train_rows, val_rows, batch_size, world_size, accumulation_steps, epochs, max_steps)


def split_rows(num_rows: int, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows): a seeded choice of ``round(val_fraction * rows)`` rows held out.

    A function of these three numbers alone, so `plora eval --split val` finds a run's held-out rows again.
    """
    if num_rows == 0:
        raise PloraError("the shards hold no rows to train on")
    num_val = round(val_fraction * num_rows)
    if val_fraction > 0 and num_val == 0:
        num_val = 1
    if num_val >= num_rows:
        raise PloraError(f"--val-fraction {val_fraction} leaves no training rows out of {num_rows}")
    chosen = np.random.default_rng(seed + VALIDATION_SEED_OFFSET).permutation(num_rows)
    return np.sort(chosen[num_val:]), np.sort(chosen[:num_val])


def epoch_order(
    plan: DataPlan, epoch: int, seed: int, lengths: np.ndarray, group_by_length: bool
) -> np.ndarray:
    """The training rows in the order epoch ``epoch`` visits them."""
    rng = np.random.default_rng(seed + epoch)
    order = plan.train_rows[rng.permutation(len(plan.train_rows))]
    if not group_by_length:
        return order
    return _grouped_by_length(order, lengths, plan.global_batch, rng)


def _grouped_by_length(
    order: np.ndarray, lengths: np.ndarray, global_batch: int, rng: np.random.Generator
) -> np.ndarray:
    """``order``'s rows as global batches of similar length, the batches in a random order.

    Rows are sorted longest first (rows of one length keep their shuffled order), cut into global batches
    and the full batches shuffled; the remainder, the shortest rows, stays last, as the one short step of
    an epoch must (see the module docstring).
    """
    by_length = order[np.argsort(-lengths[order], kind="stable")]
    full = len(by_length) // global_batch
    batches = by_length[: full * global_batch].reshape(full, global_batch)[rng.permutation(full)]
    return np.concatenate([batches.reshape(-1), by_length[full * global_batch :]])


def step_rows(order: np.ndarray, plan: DataPlan, step_in_epoch: int) -> np.ndarray:
    """The rows of one optimizer step (the global batch, all processes together)."""
    start = step_in_epoch * plan.global_batch
    return order[start : start + plan.global_batch]


def micro_batches(global_rows: np.ndarray, plan: DataPlan, rank: int) -> list[np.ndarray]:
    """This process's ``accumulation_steps`` slices of a global batch (some may be empty on a short step)."""
    slices = np.array_split(global_rows, plan.accumulation_steps * plan.world_size)
    return [slices[m * plan.world_size + rank] for m in range(plan.accumulation_steps)]


def validation_batches(plan: DataPlan, rank: int) -> list[np.ndarray]:
    """This process's share of the validation rows in batches of ``batch_size``."""
    mine = np.array_split(plan.val_rows, plan.world_size)[rank]
    return [mine[i : i + plan.batch_size] for i in range(0, len(mine), plan.batch_size)]
