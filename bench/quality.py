"""Benchmark: is parallel generation good on a real model? (issue 7 item 5)

SmolLM2-135M-Instruct (the demo model, `plora demo-model`) on CPU. Data: the list answers of
Alpaca (`plora convert --split-lists`), split with a seed into training records and a held-out set
A; a second held-out set B is the list answers of another Alpaca slice. Both are CC BY-NC and stay
outside the repository (`../shared/data`).

Held-out loss per trained token (the branch tokens and their EOS):

- (a) the base model, unpatched, each branch alone after its trunk (the reference);
- (b) the 2D-RoPE-patched base model, parallel layout;
- (c) a LoRA trained by plora in the parallel layout;
- (d) a LoRA trained on the same records one branch per sequence (unpatched), with the same steps
  and about the same tokens per step. The parallel penalty is (c) - (d).

(b) and (c) run for each setting on set A: the default (isolated mask, --rope-2d-ratio 0.5,
--stride 128) and one change at a time (columnar mask, ratio 0.25, stride 32); set B has the default.
Lists of 3 to 6 items only (the cost of a row grows with its branches).

Generation with the default setting's adapter on held-out prompts, K = the reference answer's item
count, four ways: the model alone, greedy and sampled; greedy with each branch started by its list
marker (`plora generate --marker M`, M the reference answer's style); and that with `--distinct`.
Per way: the share of distinct branches (by content: an item without its list marker, case and
spacing; under --distinct this holds by construction), the share that are not near-duplicates of an
earlier branch (word overlap < 50%), the share that end at EOS, coherence (each branch's mean token
loss under the base model, alone after its trunk, relative to the same for the items of the base
model's own sequential answer: greedy, the issue's measure, and decoded the same way as the
branches) and the wall time of the parallel answer against a sequential answer of the same number
of tokens (the same decoder, one branch).

    python -m bench.quality --data ../shared/data/alpaca_2k.json --data-b ../shared/data/alpaca_2000_2999.json
    python -m bench.quality --quick ...      # a 2-3 minute smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from parallel.decoder import decode_parallel
from parallel.errors import Rejects
from parallel.generation import branch_prompts
from parallel.ggufmodel import demo_gguf, ensure_gguf_model
from parallel.layout import DEFAULT_ROPE_2D_RATIO, DEFAULT_STRIDE, PackingOptions
from parallel.sampling import SamplingOptions
from parallel.tokenizer import load_tokenizer, special_tokens
from pipeline.convert import ConvertOptions, convert, open_rejects
from pipeline.lists import MARKER, ListSplit, split_answer
from pipeline.tokenize import TokenizeJob, tokenize_to_shards
from trainer.config import TrainConfig
from trainer.evaluate import EvalOptions, run_eval
from trainer.loop import train

GOALS = {"penalty": 0.05, "distinct": 0.90, "coherence": 1.2, "speedup": 2.4}


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one run spends: chosen so that the full run fits about half an hour on 2 shared cores."""

    heldout: int  # records of held-out set A (and at most this many of B)
    steps: int  # optimizer steps of every LoRA
    batch: int  # parallel rows per step; the sequential LoRA takes as many rows as branches
    settings: int  # how many of SETTINGS to train
    prompts: int  # held-out prompts to generate from (those with K >= 4 first)
    max_new_tokens: int  # per branch


# Measured here: a training step of one parallel row (its branches as ~4 sequential rows) takes
# 1-3 s with --attn auto (shared-prefix attention, padding-free batches), a held-out forward runs at
# ~300 tokens/s, decoding at 5-10 tokens/s. The full run: 5 LoRAs x 64 steps, 10 parallel and 4
# sequential held-out evaluations, 8 prompts x 4 ways of generation: about 30 minutes on 2 cores.
FULL = Budget(heldout=20, steps=64, batch=1, settings=4, prompts=8, max_new_tokens=24)
QUICK = Budget(heldout=4, steps=2, batch=1, settings=1, prompts=1, max_new_tokens=8)
# Lists of 3 to 6 items: every branch count the demo uses, at a cost this CPU can pay.
MIN_K, MAX_K = 3, 6


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    mask: str = "isolated"
    ratio: float = DEFAULT_ROPE_2D_RATIO
    stride: int = DEFAULT_STRIDE


# The default first; then one change at a time.
SETTINGS = (
    Setting("default"),
    Setting("columnar", mask="columnar"),
    Setting("ratio 0.25", ratio=0.25),
    Setting("stride 32", stride=32),
)
LORA = {"lora_rank": 16, "lora_alpha": 32.0, "learning_rate": 1e-3, "warmup": 2, "dtype": "bfloat16"}


def say(message: str) -> None:
    """Progress on stderr (stdout keeps the table or the JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def list_records(path: Path, work: Path) -> list[dict[str, Any]]:
    """The chat parallel records of MIN_K..MAX_K branches that `plora convert --split-lists` makes of
    ``path`` (bad records skipped)."""
    out = work / f"{path.stem}.lists.jsonl"
    convert([path], out, ConvertOptions(split_lists=True), open_rejects("skip", out), progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return [r for r in records if MIN_K <= len(r.get("branches", ())) <= MAX_K]


def trunk_text(record: dict[str, Any], tokenizer: Any) -> str:
    rendered = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=False)
    return rendered + record.get("lead", "")


def as_tokenizable(record: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """A plain parallel record whose ``main`` is the chat parallel record's trunk text (the template's
    render plus the lead-in). Tokenized without training the trunk, so that no trunk token is
    trained in either layout (a chat record trains its lead-in, which the sequential layout would
    count once per branch) and every loss below is over the same tokens: each branch's start, content
    and EOS."""
    return {"main": trunk_text(record, tokenizer), "branches": record["branches"]}


def one_branch_each(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sequential layout: each branch alone after its trunk."""
    return [{**r, "branches": [b]} for r in records for b in r["branches"]]


def shards(records: list[dict[str, Any]], name: str, work: Path, model_dir: Path) -> Path:
    source = work / f"{name}.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    out = work / "shards" / name
    packing = PackingOptions(branches=1, max_seq_len=1024, train_trunk=False)
    tokenize_to_shards(
        TokenizeJob(inputs=(source,), tokenizer=model_dir, out=out, packing=packing),
        Rejects("raise"),
        progress=False,
    )
    return out


# ----------------------------------------------------------------------------------------------
# Losses and training
# ----------------------------------------------------------------------------------------------


def layout_options(setting: Setting | None) -> dict[str, Any]:
    """The 2D RoPE and mask options of eval and training for ``setting`` (None: unpatched)."""
    s = setting or SETTINGS[0]
    return {"patch_rope": setting is not None, "rope_2d_ratio": s.ratio, "stride": s.stride, "mask": s.mask}


def heldout_loss(shard_dir: Path, model_dir: Path, adapter: Path | None, setting: Setting | None) -> float:
    """Mean loss per trained token; ``setting`` None: the unpatched base model (or an unpatched LoRA)."""
    options = EvalOptions(
        shards=str(shard_dir),
        base_model=str(model_dir),
        adapter=str(adapter) if adapter else None,
        batch_size=8,
        dtype="bfloat16",
        device="cpu",
        attn="sdpa",
        **layout_options(setting),
    )
    totals, _ = run_eval(options)
    return totals.mean


def train_lora(
    shard_dir: Path, model_dir: Path, out: Path, setting: Setting | None, batch: int, budget: Budget
) -> Path:
    cfg = TrainConfig(
        shards=str(shard_dir),
        base_model=str(model_dir),
        attn="auto",
        device="cpu",
        **layout_options(setting),
        batch_size=batch,
        epochs=100,
        max_steps=budget.steps,
        out_dir=str(out),
        log_interval=10**6,
        save_interval=10**6,
        progress=False,
        **LORA,
    )
    return train(cfg).final_dir


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def base_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


@torch.no_grad()
def text_loss(model: Any, trunk: list[int], ids: list[int]) -> tuple[float, int]:
    """Summed loss of ``ids`` after ``trunk`` (sequential layout), and its token count."""
    if not ids:
        return 0.0, 0
    logits = model(torch.tensor([trunk + ids])).logits[0, len(trunk) - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids), reduction="sum")), len(ids)


def mean_loss(model: Any, trunk: list[int], texts: list[list[int]]) -> float:
    parts = [text_loss(model, trunk, ids) for ids in texts]
    tokens = sum(n for _, n in parts)
    return sum(s for s, _ in parts) / tokens if tokens else float("nan")


def sequential_items(
    model: Any, tokenizer: Any, trunk: list[int], lead: str, max_tokens: int, sampling: SamplingOptions
) -> list[str]:
    """The items of the base model's own answer (one sequence, decoded as ``sampling`` says: greedy
    or sampled with the same temperature, top-p and top-k); [] when it is not a list."""
    if sampling.greedy:
        how: dict[str, Any] = {"do_sample": False}
    else:
        torch.manual_seed(sampling.seed or 0)
        how = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    out = model.generate(
        torch.tensor([trunk]),
        max_new_tokens=max_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        **how,
    )
    answer = lead + tokenizer.decode(out[0, len(trunk) :], skip_special_tokens=True)
    split = split_answer(answer, min_items=2)
    return split.items if isinstance(split, ListSplit) else []


GREEDY, SAMPLED = SamplingOptions(), SamplingOptions(0.7, 0.9, seed=0)
# The model alone, greedy and sampled; then greedy as a user asks for a list: `plora generate
# --marker M` (M the reference answer's own marker style: "{k}.", "{k})" or its bullet), and with
# --distinct too (name, sampling, whether the branches start with the marker).
WAYS = (
    ("greedy", GREEDY, False),
    ("sampled", SAMPLED, False),
    ("greedy, marker", GREEDY, True),
    ("greedy, marker, distinct", dataclasses.replace(GREEDY, distinct=True), True),
)


def marker_of(record: dict[str, Any]) -> str:
    """The --marker that writes the record's list style: its first item's marker, numbered by {k}."""
    found = MARKER.match(record["branches"][0])
    assert found is not None  # a --split-lists branch starts with its marker
    return "{k}" + found["delim"] if found["number"] else found["bullet"]


def item_content(text: str) -> str:
    """A branch's item without its list marker, case and spacing: "1. Save" and "2. save" are the
    same item, so numbering alone does not make branches distinct."""
    found = MARKER.match(text)
    return " ".join((text[found.end() - 1 :] if found else text).lower().split())


def word_overlap(a: str, b: str) -> float:
    """Jaccard overlap of two items' words: near-duplicates ("Fix leaks." and "Fix the leaks.") score
    high, which exact distinctness does not see; two items without words are the same item."""
    words_a, words_b = (set(re.findall(r"\w+", item_content(t))) for t in (a, b))
    return len(words_a & words_b) / len(words_a | words_b) if words_a | words_b else 1.0


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclasses.dataclass(frozen=True)
class Yardstick:
    """The base model's own sequential answer to each prompt, and its items' mean loss (NaN where
    the answer is not a list): what a branch's coherence is measured against."""

    items: list[list[str]]
    loss: list[float]


def yardstick(base: Any, tokenizer: Any, trunks: list[list[int]], prompts: list[dict[str, Any]],
              budget: Budget, sampling: SamplingOptions) -> Yardstick:  # fmt: skip
    items = [
        sequential_items(
            base, tokenizer, t, r.get("lead", ""), budget.max_new_tokens * len(r["branches"]), sampling
        )
        for t, r in zip(trunks, prompts, strict=True)
    ]
    loss = [
        mean_loss(base, t, [encode(tokenizer, i) for i in own]) for t, own in zip(trunks, items, strict=True)
    ]
    return Yardstick(items, loss)


def generation(
    model: Any, base: Any, tokenizer: Any, prompts: list[dict[str, Any]], budget: Budget
) -> dict[str, Any]:
    special = special_tokens(tokenizer)
    trunks = [encode(tokenizer, trunk_text(r, tokenizer)) for r in prompts]
    # Coherence against the base model's greedy answer (the measure) and, like for like,
    # against its answer decoded the same way as the branches.
    sticks = {way: yardstick(base, tokenizer, trunks, prompts, budget, way) for way in (GREEDY, SAMPLED)}
    decode_parallel(model, trunks[0], [[]], special=special, max_new_tokens=2)  # warm-up, not timed
    result: dict[str, Any] = {}
    for way, sampling, marked in WAYS:
        same = sticks[GREEDY if sampling.greedy else SAMPLED]
        branches = distinct = far_apart = eos = 0
        ratios: dict[str, list[float]] = {"coherence": [], "coherence_same": []}
        speedups, examples = [], []
        for n, (record, trunk) in enumerate(zip(prompts, trunks, strict=True)):
            k = len(record["branches"])
            starts = branch_prompts(None, None, k, marker_of(record) if marked else "")
            par = decode_parallel(
                model, trunk, [encode(tokenizer, s) if s else [] for s in starts], special=special,
                max_new_tokens=budget.max_new_tokens, sampling=sampling,
            )  # fmt: skip
            texts = [
                s + tokenizer.decode(t, skip_special_tokens=True)
                for s, t in zip(starts, par.tokens, strict=True)
            ]
            branches += k
            distinct += len({item_content(t) for t in texts})
            far_apart += sum(all(word_overlap(t, u) < 0.5 for u in texts[:i]) for i, t in enumerate(texts))
            eos += par.finish_reasons.count("eos")
            # A sequential answer of as many tokens, by the same decoder and model: one branch.
            seq = decode_parallel(
                model, trunk, [[]], special=special, max_new_tokens=par.generated_tokens,
                sampling=dataclasses.replace(sampling, distinct=False), stop_ids=(),
            )  # fmt: skip
            if k >= 4:
                speedups.append(seq.seconds / par.seconds)
            loss = mean_loss(base, trunk, [encode(tokenizer, t) for t in texts])
            for key, stick in (("coherence", sticks[GREEDY]), ("coherence_same", same)):
                if stick.items[n]:
                    ratios[key].append(loss / stick.loss[n])
            examples.append({"prompt": record["messages"][-1]["content"], "branches": texts})
        result[way] = {
            "branches": branches,
            "distinct": distinct / branches,
            "far_apart": far_apart / branches,
            "eos": eos / branches,
            **{key: sum(r) / len(r) if r else float("nan") for key, r in ratios.items()},
            **{f"{key}_prompts": len(r) for key, r in ratios.items()},
            "speedup_k4": sum(speedups) / len(speedups) if speedups else float("nan"),
            "speedup_prompts": len(speedups),
            "examples": examples,
        }
    return result


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, budget: Budget, work: Path) -> dict[str, Any]:
    model_dir = ensure_gguf_model(demo_gguf())
    tokenizer = load_tokenizer(model_dir)
    records = list_records(args.data, work)
    random.Random(args.seed).shuffle(records)
    train_records, held_a = records[budget.heldout :], records[: budget.heldout]
    held_b = list_records(args.data_b, work)[: budget.heldout]
    ready = lambda rs: [as_tokenizable(r, tokenizer) for r in rs]  # noqa: E731
    data = {
        "train": shards(ready(train_records), "train", work, model_dir),
        "train_seq": shards(ready(one_branch_each(train_records)), "train_seq", work, model_dir),
    }
    heldout = {"A": held_a, "B": held_b}
    for name, rs in heldout.items():
        data[name] = shards(ready(rs), name, work, model_dir)
        data[name + "_seq"] = shards(ready(one_branch_each(rs)), name + "_seq", work, model_dir)
    seq_batch = round(budget.batch * sum(len(r["branches"]) for r in train_records) / len(train_records))

    say(f"{len(train_records)} training records, held-out {len(held_a)} + {len(held_b)}; sequential LoRA (d)")
    timing: dict[str, float] = {}
    started = time.monotonic()
    sequential = train_lora(data["train_seq"], model_dir, work / "lora-seq", None, seq_batch, budget)
    timing["train sequential"] = time.monotonic() - started
    losses: dict[str, dict[str, float]] = {}
    for name in heldout:
        say(f"held-out {name}: (a) and (d), each branch alone after its trunk")
        losses[name] = {
            "a": heldout_loss(data[name + "_seq"], model_dir, None, None),
            "d": heldout_loss(data[name + "_seq"], model_dir, sequential, None),
        }
    adapters = {}
    for setting in SETTINGS[: budget.settings]:
        say(f"setting {setting}: training (c), then (b) and (c) on the held-out sets")
        started = time.monotonic()
        adapters[setting.name] = train_lora(
            data["train"], model_dir, work / f"lora-{setting.name}", setting, budget.batch, budget
        )
        timing[f"train {setting.name}"] = time.monotonic() - started
        for name in heldout if setting is SETTINGS[0] else ("A",):
            losses[name][f"b {setting.name}"] = heldout_loss(data[name], model_dir, None, setting)
            losses[name][f"c {setting.name}"] = heldout_loss(
                data[name], model_dir, adapters[setting.name], setting
            )

    from parallel.loading import load_parallel_model

    prompts = sorted(held_a, key=lambda r: len(r["branches"]) < 4)[: budget.prompts]  # K >= 4 first (speedup)

    say("generation")
    started = time.monotonic()
    model, _, _ = load_parallel_model(model_dir, adapters[SETTINGS[0].name])
    generated = generation(model, base_model(model_dir), tokenizer, prompts, budget)
    timing["generation"] = time.monotonic() - started
    return {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "budget": dataclasses.asdict(budget),
        "lora": LORA,
        "records": {
            "train": len(train_records),
            "A": len(held_a),
            "B": len(held_b),
            "train_branches": sum(len(r["branches"]) for r in train_records),
            "seq_batch": seq_batch,
        },
        "losses": losses,
        "generation": generated,
        "seconds": timing,
    }


LABELS = {
    "a": "(a) base, each branch alone",
    "d": "(d) LoRA, one branch per sequence",
    "b": "(b) patched base, parallel:",
    "c": "(c) LoRA, parallel:",
}


def verdict(ok: bool) -> str:
    return "good" if ok else "BAD"


def report(result: dict[str, Any]) -> str:
    lines = [
        f"bench.quality: {result['machine']}",
        f"budget: {result['budget']}",
        f"records: {result['records']}; LoRA {result['lora']}",
        "",
        "held-out loss per trained token (nats)",
        f"{'model and layout':<42}" + "".join(f"{n:>9}" for n in result["losses"]),
    ]
    for key in result["losses"]["A"]:
        label = f"{LABELS[key[0]]}{key[1:]}"
        lines.append(
            f"{label:<42}" + "".join(f"{v.get(key, float('nan')):>9.3f}" for v in result["losses"].values())
        )
    for name, v in result["losses"].items():
        penalty = v["c default"] - v["d"]
        judged = verdict(penalty <= GOALS["penalty"])
        lines.append(f"penalty (c)-(d) on {name}: {penalty:+.3f} (goal <= {GOALS['penalty']}: {judged})")
    g = result["generation"]
    ways = [w for w, _, _ in WAYS]
    short = dict(zip(ways, ("greedy", "sampled", "marker", "+distinct"), strict=True))
    lines += [
        "",
        f"{'generation (default adapter)':<32}" + "".join(f"{short[w]:>10}" for w in ways) + "  goal",
    ]
    rows = [
        ("distinct branches", "distinct", f">= {GOALS['distinct']}", lambda x: x >= GOALS["distinct"]),
        ("  and < 50% word overlap", "far_apart", None, None),
        ("end at EOS", "eos", None, None),
        (
            "coherence (x base greedy)",
            "coherence",
            f"<= {GOALS['coherence']}",
            lambda x: x <= GOALS["coherence"],
        ),
        ("coherence (x base, same way)", "coherence_same", None, None),
        ("speedup at K >= 4", "speedup_k4", f">= {GOALS['speedup']}", lambda x: x >= GOALS["speedup"]),
    ]
    for label, key, goal, ok in rows:
        cells = "".join(f"{g[w][key]:>10.2f}" for w in ways)
        judged = (
            f"  {goal} (" + ", ".join(f"{short[w]} {verdict(ok(g[w][key]))}" for w in ways) + ")"
            if ok
            else ""
        )
        lines.append(f"{label:<32}{cells}{judged}")
    lines += [
        f"branches {g['greedy']['branches']}; coherence from "
        + ", ".join(f"{g[w]['coherence_prompts']}/{g[w]['coherence_same_prompts']}" for w in ways)
        + f" prompts (the base answer is a list); speedup from {g['greedy']['speedup_prompts']}",
        "marker: `plora generate --marker M`, M the reference answer's marker; +distinct: and --distinct,",
        "under which no two branches generate the same tokens, so 'distinct' holds by construction there",
        "(up to case and spacing): its word-overlap row is the one to read.",
    ]
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))
    for way in ("greedy", "greedy, marker", "greedy, marker, distinct"):
        example = g[way]["examples"][0]
        lines += [
            "",
            f"example ({way}): {example['prompt']}",
            *(f"  [{i}] {t!r}" for i, t in enumerate(example["branches"], 1)),
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/alpaca_2k.json"))
    parser.add_argument("--data-b", type=Path, default=Path("../shared/data/alpaca_2000_2999.json"))
    parser.add_argument("--quick", action="store_true", help="a 2-3 minute smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work", type=Path, default=None, help="keep shards and adapters here (default: a temp dir)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    budget = QUICK if args.quick else FULL
    say(f"budget: {budget}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="plora-quality-") as temp:
        work = args.work or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, budget, work)
    result["seconds"]["total"] = time.monotonic() - started
    print(json.dumps(result, indent=1) if args.json else report(result))


if __name__ == "__main__":
    main()
