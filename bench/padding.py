"""Padding share of a training epoch's micro-batch slots: padded rows (random order, or --group-by-length)
against padding-free batches (issue 11 item 2).

    python -m bench.padding [--data alpaca_2k.json] [--batch-size 12] [--branches 4] [--time N]

The data are tokenized with the tiny model's tokenizer (pipeline.tinymodel) into ``--branches`` a row; the
epochs are the trainer's own (trainer.data.epoch_order, seed 42). A slot is one token position the model's
linear layers run on: B x L for a padded batch, the rows' tokens for a padding-free one. For the prefix
backend the padding of its per-layer attention groups ([n, Q] sequences of similar length,
parallel.prefix) is reported too: those slots only enter attention. ``--time N`` also trains N batches
of each way (forward + backward, the small random-weight Qwen2 of bench.train, LoRA r8, fp32, one
thread, CPU-time clock) and reports real tokens per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.train import build_model, fresh_model
from parallel.errors import Rejects
from parallel.layout import PackingOptions
from parallel.prefix import prefix_plan
from pipeline.convert import ConvertOptions
from pipeline.shards import open_shards
from pipeline.tinymodel import ensure_tiny_model
from pipeline.tokenize import TokenizeJob, tokenize_to_shards
from trainer.data import RowStore, epoch_order, make_plan
from trainer.model import PackedLoss

DEFAULT_DATA = Path("/work/shared/data/alpaca_2k.json")


def epoch_batches(store: RowStore, batch_size: int, seed: int, grouped: bool) -> list[np.ndarray]:
    """The micro-batches of the trainer's first epoch (one process, no accumulation)."""
    plan = make_plan(
        len(store), val_fraction=0.0, seed=seed, batch_size=batch_size, world_size=1,
        accumulation_steps=1, epochs=1, max_steps=0,
    )  # fmt: skip
    order = epoch_order(plan, 0, seed, store.num_tokens, grouped)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_shares(store: RowStore, batch_size: int, seed: int) -> dict[str, float]:
    """Share of padding slots over one epoch, for each way of batching."""
    real = int(store.num_tokens.sum())
    shares = {}
    for grouped in (False, True):
        batches = epoch_batches(store, batch_size, seed, grouped)
        slots = sum(len(b) * int(store.num_tokens[b].max()) for b in batches)
        shares["grouped" if grouped else "random"] = 1 - real / slots
    shares["padding-free"] = 0.0  # slots = the rows' own tokens, by construction
    for grouped in (False, True):
        group_slots = group_real = 0
        for rows in epoch_batches(store, batch_size, seed, grouped):
            free = store.collate(rows, padding_free=True)
            prefix = prefix_plan(free.branch_id, free.time_id, None, free.row_id)
            group_slots += sum(group.queries.numel() for group in prefix.groups)
            group_real += free.num_tokens
        order = "grouped" if grouped else "random"
        shares[f"prefix attention groups, {order} (attention only)"] = 1 - group_real / max(group_slots, 1)
    return shares


def tokens_per_second(store: RowStore, args: argparse.Namespace, work: Path) -> dict[str, float]:
    """Real tokens per CPU second of training steps, for each way of batching and attention."""
    torch.set_num_threads(1)
    model_dir = build_model(work / "model", ensure_tiny_model(), "small", "float32")
    ways = {  # name: (attention, grouped order, padding-free)
        "sdpa, padded, random order": ("sdpa", False, False),
        "sdpa, padded, grouped by length": ("sdpa", True, False),
        "prefix, padded, random order": ("prefix", False, False),
        "prefix, padding-free, random order": ("prefix", False, True),
        "prefix, padding-free, grouped by length": ("prefix", True, True),
    }
    rates = {}
    for name, (attn, grouped, free) in ways.items():
        model, stride = fresh_model(
            model_dir, patch=True, device=torch.device("cpu"), attn=attn, dtype="float32"
        )
        loss_module = PackedLoss(model, mask="isolated", stride=stride)
        batches = epoch_batches(store, args.batch_size, args.seed, grouped)[: args.time]
        seconds = 0.0
        for rows in batches:
            batch = store.collate(rows, padding_free=free)
            start = time.process_time()
            loss = loss_module(*batch.loss_inputs)
            loss.backward()
            seconds += time.process_time() - start
        rates[name] = sum(int(store.num_tokens[b].sum()) for b in batches) / seconds
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--time", type=int, default=0, help="Also time N training batches of each way.")
    args = parser.parse_args()
    inputs = (args.data,) if args.data.is_file() else tuple(sorted(Path("data").glob("sample_*")))
    with tempfile.TemporaryDirectory() as tmp:
        packing = PackingOptions(branches=args.branches)
        job = TokenizeJob(
            inputs=inputs, tokenizer=ensure_tiny_model(), out=Path(tmp) / "shards", packing=packing,
            convert=ConvertOptions(),
        )  # fmt: skip
        tokenize_to_shards(job, Rejects("raise"), progress=False)
        store = RowStore(open_shards(str(Path(tmp) / "shards")))
        shares = padding_shares(store, args.batch_size, args.seed)
        rates = tokens_per_second(store, args, Path(tmp)) if args.time else {}
    source = ", ".join(str(p) for p in inputs)
    print(f"{source}: {len(store)} rows of {args.branches} branches, batch {args.batch_size}")
    for name, share in shares.items():
        print(f"  {name:<50} padding {share:6.1%} of slots")
    for name, rate in rates.items():
        print(f"  {name:<50} {rate:8.0f} real tokens/s (first {args.time} batches)")


if __name__ == "__main__":
    main()
