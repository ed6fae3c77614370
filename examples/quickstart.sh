#!/usr/bin/env bash
# The whole pipeline on a generated tiny llama model, in about a minute:
# model -> imatrix -> measurements -> strategy at a 4.5 bpw budget -> one-pass convert -> verify vs uniform quants.
set -euo pipefail
cd "$(dirname "$0")/.."
W="${1:-${TMPDIR:-/tmp}/gguf-strategy-quickstart}"
mkdir -p "$W"
# Start over on a rerun: outputs left by an older version would belong to another model (measure refuses a db of
# another model). Only this script's own files are removed.
rm -rf "$W/model" "$W/report"
rm -f "$W/tensors.txt" "$W/imatrix.gguf" "$W/measure.sqlite"* "$W/plan.yaml" "$W/plan-summary.txt" \
    "$W/model-plan.gguf" "$W/model-f32.gguf"
step() { printf '\n== %s\n' "$*"; }

step "1. a tiny llama checkpoint with a real SentencePiece tokenizer -> $W/model"
python3 tests/tiny_models.py llama "$W/model"

step "2. see the model: every tensor as the converter emits it"
python3 -m measure inspect "$W/model" > "$W/tensors.txt"
head -n 12 "$W/tensors.txt"

step "3. importance matrix with torch from bundled calibration text"
python3 -m measure imatrix "$W/model" --text tests/data/calibration.txt --ctx 128 --chunks 16 -o "$W/imatrix.gguf"

step "4. round-trip every tensor through every type (resumable sqlite db)"
python3 -m measure "$W/model" --imatrix "$W/imatrix.gguf" --db "$W/measure.sqlite" --no-progress

step "5. a plan for an average of 4.5 bits per weight"
python3 -m strategy build --db "$W/measure.sqlite" --model "$W/model" --imatrix "$W/imatrix.gguf" \
    --target-bpw 4.5 -o "$W/plan.yaml"
python3 -m strategy show "$W/plan.yaml" > "$W/plan-summary.txt"
head -n 20 "$W/plan-summary.txt"

step "6. one-pass convert: HF checkpoint -> mixed-precision GGUF"
python3 convert_hf_to_gguf_strategy.py "$W/model" --strategy "$W/plan.yaml" --imatrix "$W/imatrix.gguf" \
    --outfile "$W/model-plan.gguf"
python3 convert_hf_to_gguf_strategy.py "$W/model" --outtype f32 --outfile "$W/model-f32.gguf"

step "7. verify: perplexity and KL-divergence vs the F32 base and uniform quants"
python3 -m verify --base "$W/model-f32.gguf" --text tests/data/evaluation.txt --ctx 128 --chunks 8 \
    --compare-uniform --model-dir "$W/model" --imatrix "$W/imatrix.gguf" -o "$W/report" "$W/model-plan.gguf"
echo
echo "report: $W/report (table, CSV/JSON, KLD-vs-size chart as PNG and HTML)"
