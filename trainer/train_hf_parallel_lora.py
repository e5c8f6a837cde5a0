"""The original guide's entry point, flags verbatim:

    python trainer/train_hf_parallel_lora.py --base_model DIR --data_path data.jsonl --lora_rank 8 ...
    torchrun --nproc_per_node 4 trainer/train_hf_parallel_lora.py ... --ddp

The guide's data flags (``--data_path``, ``--hf_dataset``, ``--hf_subset``, ``--use_streaming``,
``--max_seq_len``, ``--branches_per_sample``, ``--max_branches_per_sample``) are tokenized with
`plora tokenize`'s code into a cached shard directory ``<out_dir>/shards/<key>`` (key: the inputs' bytes,
the tokenizer and the packing options; an up-to-date cache is reused, an interrupted one resumed). Under
torchrun only global rank 0 tokenizes while every other process waits for it (up to 3 hours, see
trainer.distributed), so on several nodes ``--out_dir`` must be on a filesystem every node shares;
otherwise tokenize first with `plora tokenize` and pass ``--shards``. Every other flag then goes to
`plora train` unchanged, so this is the same training code. ``--shards DIR`` skips the tokenizing.

The guide's inference snippet imports ``auto_pair_indices`` from here; it is re-exported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist

from cli.main import main as plora_main
from parallel.errors import PloraError, Rejects
from parallel.layout import DEFAULT_BRANCHES, DEFAULT_MAX_SEQ_LEN, FORMAT_VERSION, PackingOptions
from parallel.pretrained import resolve_pretrained
from parallel.rope2d import auto_pair_indices  # noqa: F401 - the guide imports it from this module
from pipeline.convert import ConvertOptions, input_fingerprint_parts
from pipeline.tokenize import TokenizeJob, tokenize_to_shards
from trainer.distributed import init_distributed


def guide_data_parser() -> argparse.ArgumentParser:
    """The flags this script handles itself; everything else is `plora train`'s."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--data_path", "--data-path")
    parser.add_argument("--hf_dataset", "--hf-dataset")
    parser.add_argument("--hf_subset", "--hf-subset")
    parser.add_argument("--hf_split", "--hf-split", default="train")
    parser.add_argument("--use_streaming", "--use-streaming", action="store_true")
    parser.add_argument("--max_seq_len", "--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN)
    parser.add_argument("--branches_per_sample", "--branches-per-sample", type=int, default=DEFAULT_BRANCHES)
    parser.add_argument("--max_branches_per_sample", "--max-branches-per-sample", type=int, default=0)
    parser.add_argument("--shards")
    # Read here and passed on: the tokenizer to tokenize with and where the cache goes.
    parser.add_argument("--base_model", "--base-model")
    parser.add_argument("--tokenizer_path", "--tokenizer-path")
    parser.add_argument("--out_dir", "--out-dir", default="out")
    parser.add_argument("--device", default="auto")  # the process group's backend follows it
    return parser


def cache_dir(args: argparse.Namespace, packing: PackingOptions) -> Path:
    options = ConvertOptions(hf_subset=args.hf_subset, hf_split=args.hf_split, streaming=args.use_streaming)
    inputs = [args.data_path] if args.data_path else []
    parts = {
        "inputs": input_fingerprint_parts(inputs, args.hf_dataset, options=options),
        "tokenizer": resolve_pretrained(args.tokenizer_path or args.base_model, what="tokenizer").name,
        "packing": packing.to_json(),
        "format": FORMAT_VERSION,  # shards of another layout go elsewhere, never reused
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return Path(args.out_dir) / "shards" / key


def packing_options(args: argparse.Namespace) -> PackingOptions:
    try:
        return PackingOptions(
            branches=args.branches_per_sample,
            max_branches=args.max_branches_per_sample,
            max_seq_len=args.max_seq_len,
        )
    except ValueError as err:
        raise PloraError(f"bad packing options: {err}") from None


def tokenize_guide_data(args: argparse.Namespace, out: Path, packing: PackingOptions) -> None:
    """Tokenize the guide's data flags into ``out`` (nothing to do when the cache is up to date)."""
    job = TokenizeJob(
        inputs=(Path(args.data_path),) if args.data_path else (),
        tokenizer=args.tokenizer_path or args.base_model,
        out=out,
        packing=packing,
        convert=ConvertOptions(
            hf_subset=args.hf_subset, hf_split=args.hf_split, streaming=args.use_streaming
        ),
        hf_dataset=args.hf_dataset,
        resume=True,  # up to date: reused; interrupted: finished; empty: built
    )
    summary = tokenize_to_shards(job, Rejects("raise"))
    for line in summary.lines():
        print(line, file=sys.stderr)


def prepare_shards(args: argparse.Namespace) -> Path:
    """The shard directory to train on. Under torchrun global rank 0 tokenizes (into ``--out_dir``, which
    other nodes must see: a shared filesystem) and every process meets at a collective afterwards (which
    also carries a tokenizing error to all of them)."""
    if args.shards is not None:
        return Path(args.shards)
    if args.data_path is None and args.hf_dataset is None:
        raise PloraError("no training data: pass --data_path FILE, --hf_dataset NAME, or --shards DIR")
    if args.base_model is None:
        raise PloraError("--base_model is required")
    packing = packing_options(args)
    out = cache_dir(args, packing)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        tokenize_guide_data(args, out, packing)
        return out
    # The trainer reuses this process group, so it is opened for the device the run trains on.
    env = init_distributed(args.device)
    error = None
    if env.is_main:
        try:
            tokenize_guide_data(args, out, packing)
        except PloraError as err:
            error = str(err)
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise PloraError(first)
    return out


def train_argv(argv: list[str]) -> list[str]:
    """`plora train` arguments: the guide's arguments less the data flags, plus --shards."""
    args, rest = guide_data_parser().parse_known_args(argv)
    shards = prepare_shards(args)
    passed = ["--shards", str(shards), "--out-dir", args.out_dir, "--device", args.device]
    if args.base_model is not None:
        passed += ["--base-model", args.base_model]
    if args.tokenizer_path is not None:
        passed += ["--tokenizer-path", args.tokenizer_path]
    if not any(arg == "--resume" or arg.startswith("--resume=") for arg in rest):
        passed.append("--overwrite")  # the guide's script retrains from scratch when run again
    return ["train", *passed, *rest]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        train_args = train_argv(argv)
    except PloraError as err:
        print(f"plora: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.argv = ["plora", *train_args]
    plora_main()


if __name__ == "__main__":
    main()
