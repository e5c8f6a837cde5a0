#!/usr/bin/env bash
# The plora demo on the project's own sample data, offline, on CPU, in a minute or two:
# build the tiny model, convert SFT chats and plain text to canonical records, tokenize them into shards
# (fixed and dynamic branch counts), inspect the shards (summary, one row, a picture, JSON), train LoRA
# adapters with 2D RoPE on them, evaluate base vs adapter, and generate four branches in parallel.
#
# Usage: scripts/demo.sh PY DEMO_DIR     (PY: the project's python; `plora` lives beside it)
# Re-running is cheap: every step finds its output up to date or rewrites it atomically, and training
# resumes its finished run (--resume latest), which does nothing.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/demo_common.sh"
DATA="$ROOT/data"

step "1. A tiny Qwen2-style model (random weights, byte-level BPE trained on data/, ChatML template)"
run "$PLORA" tiny-model --out "$DEMO/tiny-model"

step "2. Convert: Alpaca, ShareGPT, OpenAI messages and explicit parallel records -> canonical JSONL"
mkdir -p "$DEMO/records"
run "$PLORA" convert "$DATA/sample_alpaca.json" "$DATA/sample_sharegpt.jsonl" "$DATA/sample_messages.jsonl" \
    "$DATA/sample_parallel.jsonl" --out "$DEMO/records/sft.jsonl" --format auto --mode sft
run "$PLORA" convert "$DATA/sample_text.txt" --out "$DEMO/records/text.jsonl" --format text --mode pretrain
head -c 300 "$DEMO/records/sft.jsonl"; echo " ..."

step "3. Tokenize and pack: fixed 4 branches per row, then dynamic 2..6 branches, right-aligned"
run "$PLORA" tokenize "$DEMO/records/sft.jsonl" "$DEMO/records/text.jsonl" --tokenizer "$DEMO/tiny-model" \
    --out "$DEMO/shards/fixed" --branches 4 --max-seq-len 256
run "$PLORA" tokenize "$DEMO/records/sft.jsonl" "$DEMO/records/text.jsonl" --tokenizer "$DEMO/tiny-model" \
    --out "$DEMO/shards/dynamic" --min-branches 2 --max-branches 6 --max-seq-len 128 --align right --seed 7

step "4. Inspect: totals and row 0 of the fixed shards"
run "$PLORA" inspect "$DEMO/shards/fixed" --row 0

step "5. Inspect: row 3 of the dynamic shards, with its masks drawn to a PNG"
mkdir -p "$DEMO/inspect"
run "$PLORA" inspect "$DEMO/shards/dynamic" --row 3 --png "$DEMO/inspect/dynamic-row3.png"

step "6. Inspect as JSON (for scripts)"
run "$PLORA" inspect "$DEMO/shards/fixed" --row 1 --json > "$DEMO/inspect/fixed-row1.json"
"$PY" -c 'import json, sys; facts = json.load(open(sys.argv[1])); print("JSON keys:", ", ".join(facts))' \
    "$DEMO/inspect/fixed-row1.json"

step "7. Train LoRA adapters on the fixed shards (2D RoPE, isolated mask); the loss falls"
run "$PLORA" train --shards "$DEMO/shards/fixed" --base-model "$DEMO/tiny-model" --out-dir "$DEMO/out" \
    --epochs 8 --batch-size 4 --learning-rate 2e-2 --lora-alpha 32 --warmup 4 --dtype float32 \
    --val-fraction 0.1 --log-interval 16 --save-interval 48 --no-progress --resume latest
run "$PLORA" runs "$DEMO/out" --png "$DEMO/out/loss-curves.png"

step "8. Evaluate: mean loss per trained token, base model vs the trained adapter"
run "$PLORA" eval --shards "$DEMO/shards/fixed" --base-model "$DEMO/tiny-model"
run "$PLORA" eval --shards "$DEMO/shards/fixed" --base-model "$DEMO/tiny-model" \
    --adapter "$DEMO/out/lora/hf_parallel_lora_final"

step "9. Generate four branches at once from one trunk (one sequence, one KV cache)"
run "$PLORA" generate --adapter "$DEMO/out/lora/hf_parallel_lora_final" \
    --prompt "Four ways to spend a rainy afternoon:" --num-branches 4 \
    --max-new-tokens 24 --temperature 0.8 --top-p 0.95 --seed 0

step "Done"
echo "model:   $DEMO/tiny-model"
echo "records: $DEMO/records/{sft,text}.jsonl"
echo "shards:  $DEMO/shards/{fixed,dynamic}"
echo "picture: $DEMO/inspect/dynamic-row3.png, loss curves: $DEMO/out/loss-curves.png"
echo "adapter: $DEMO/out/lora/hf_parallel_lora_final (metrics in $DEMO/out/logs)"
