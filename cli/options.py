"""Command-line options that several commands share, defined once.

`plora convert`, `plora tokenize` and `plora inspect` (on a records file) read records the same way,
tokenize and inspect pack them the same way, and train, eval, generate and export load models the
same way, so these options must have the same names, aliases (the original guide's underscore
spellings), defaults and help everywhere. Typer copies an option's
definition for each command that uses it as a default value, so one object serves them all. Train's
and eval's options are the fields of TrainConfig and EvalOptions (cli/fields.py); the model options
generate and export share with them are made from the same fields.
"""

from __future__ import annotations

import typer

from cli.fields import option_of
from parallel.errors import PloraError
from parallel.layout import ALIGN_MODES, DEFAULT_BRANCHES, DEFAULT_MAX_SEQ_LEN, PackingOptions
from pipeline.formats import FORMATS, MODES
from pipeline.readers import TXT_SPLITS
from trainer.config import TrainConfig

# Reading records (convert, tokenize, inspect).
FORMAT = typer.Option(
    "auto", "--format", help=f"Record format: auto (detected per record) | {' | '.join(FORMATS)}."
)
MODE = typer.Option(
    "sft", "--mode", help=f"{' | '.join(MODES)}: sft keeps chats as messages, pretrain makes them text."
)
TXT_SPLIT = typer.Option(
    "blank", "--txt-split", help=f"Plain .txt: one document per {' | '.join(TXT_SPLITS)} block."
)
HF_DATASET = typer.Option(
    None, "--hf-dataset", help="HuggingFace dataset: hub name, save_to_disk folder or data-file folder."
)
HF_SUBSET = typer.Option(None, "--hf-subset", help="Dataset configuration (subset) name.")
HF_SPLIT = typer.Option("train", "--hf-split", help="Dataset split.")
DROP_EMPTY_BRANCHES = typer.Option(
    False,
    "--drop-empty-branches",
    help="Drop a parallel record's empty branches (counted) instead of rejecting the whole record.",
)
ON_ERROR = typer.Option(
    "raise", "--on-error", help="raise: stop at the first bad record | skip: reject it and go on."
)
REJECTS = typer.Option(
    None, "--rejects", help="Rejects file for --on-error skip. Default: <out>.rejects.jsonl beside --out."
)

# Packing records into rows (tokenize, inspect).
# None: not given (a flag of the other mode must not be given and then ignored).
BRANCHES = typer.Option(
    None,
    "--branches",
    "--branches_per_sample",
    help=f"Branches per row (fixed mode; default {DEFAULT_BRANCHES}). Parallel records keep their own width.",
)
MIN_BRANCHES = typer.Option(None, "--min-branches", help="Dynamic mode: fewest branches per row (default 1).")
MAX_BRANCHES = typer.Option(
    0,
    "--max-branches",
    "--max_branches_per_sample",
    help="Dynamic mode (when > 0): K per row drawn uniformly from [--min-branches, --max-branches]; "
    "wider parallel records are split into rows of at most this many branches.",
)
MAX_SEQ_LEN = typer.Option(
    DEFAULT_MAX_SEQ_LEN, "--max-seq-len", "--max_seq_len", help="Longest branch; longer ones are split."
)
ALIGN = typer.Option("left", "--align", help=f"Branch time alignment: {' | '.join(ALIGN_MODES)}.")
SEED = typer.Option(0, "--seed", help="Seed of the dynamic-mode branch counts.")
NO_TRAIN_TRUNK = typer.Option(
    False, "--no-train-trunk", help="Do not train the trunk ('main') of parallel records."
)
CHAT_TEMPLATE = typer.Option(
    None, "--chat-template", help="Jinja chat template file replacing the tokenizer's own."
)


# Loading models (generate, export); train and eval take these from TrainConfig's fields too.
ADAPTER_BASE_MODEL = typer.Option(
    None, "--base-model", help="Base model directory or hub id (default: the one plora.json names)."
)
TRUST_REMOTE_CODE = option_of(TrainConfig, "trust_remote_code")
DEVICE = option_of(TrainConfig, "device")


def packing_options(
    *,
    branches: int | None,
    min_branches: int | None,
    max_branches: int,
    max_seq_len: int,
    align: str,
    seed: int,
    no_train_trunk: bool,
) -> PackingOptions:
    """The packing options of the flags above; a bad combination is a one-line error."""
    if max_branches > 0 and branches is not None:
        raise PloraError(
            "--branches (a fixed K) and --max-branches (K drawn per row) contradict each other; pass one"
        )
    if max_branches <= 0 and min_branches is not None:
        raise PloraError(
            "--min-branches needs --max-branches: dynamic mode draws K from [--min-branches, --max-branches] "
            "(for a fixed K pass --branches)"
        )
    try:
        return PackingOptions(
            branches=DEFAULT_BRANCHES if branches is None else branches,
            min_branches=1 if min_branches is None else min_branches,
            max_branches=max_branches,
            max_seq_len=max_seq_len,
            align=align,  # type: ignore[arg-type]  # PackingOptions validates it
            seed=seed,
            train_trunk=not no_train_trunk,
        )
    except ValueError as err:
        raise PloraError(f"bad packing options: {err}") from None
