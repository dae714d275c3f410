#!/usr/bin/env bash
# `make demo`: the main job on the real default model, SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI).
#  1. inspect it; 2. trace every stage of every layer; 3. import it to .apr and trace that;
#  4. diff the two traces (they must be identical); 5. requantize the .apr to Q4_K and bisect the two.
set -euo pipefail
PY=$1
APR="$(dirname "$PY")/apr"
OUT=${DEMO_OUT:-demo-out}
MODEL=$("$PY" scripts/fixtures.py smollm2)
rm -rf "$OUT" && mkdir -p "$OUT"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$APR" inspect "$MODEL" --no-tensors
step "$APR" trace "$MODEL" --save-tensor all --save-tensor-layers 0..30 --save-tensor-dir "$OUT/gguf-trace" \
  | sed -n '1,12p;/^Not captured/,$p' | grep -v '^  /'
step "$APR" import "$MODEL" -o "$OUT/smollm2.apr" | head -5
step "$APR" -q trace "$OUT/smollm2.apr" --save-tensor all --save-tensor-layers 0..30 --save-tensor-dir "$OUT/apr-trace"
step "$APR" diff "$OUT/gguf-trace" "$OUT/apr-trace" --values --check | tail -3
step "$APR" convert "$OUT/smollm2.apr" -o "$OUT/smollm2-q4k.apr" --quantize q4_k | head -5
step "$APR" bisect "$OUT/smollm2.apr" "$OUT/smollm2-q4k.apr" --report "$OUT/bisect.html"
printf '\nTraces, models and the HTML report are in %s/\n' "$OUT"
