#!/usr/bin/env bash
# The README's `compare` example: two short sweeps of the embedded tiny.en, one served in
# float32 and one in bfloat16, standing in for two instance types; then `compare` them.
# Usage: scripts/dtype_example.sh [OUT_DIR] [extra `loadgen run` flags...]
# DATASET (default: ../shared/data/LibriSpeech/test-other) and PORT (50081) can be set.
set -euo pipefail
out=${1:-runs/dtype-example}
shift || true
dataset=${DATASET:-../shared/data/LibriSpeech/test-other}
port=${PORT:-50081}
py=.venv/bin/python
mkdir -p "$out"
for dtype in float32 bfloat16; do
  $py -m server --host 127.0.0.1 --port "$port" --metrics-port -1 --model tiny.en \
    --dtype "$dtype" 2> "$out/server-$dtype.log" &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  $py -m loadgen run --target "127.0.0.1:$port" --dataset "$dataset" --wait-ready 600 \
    --label "cpu-$dtype" --concurrency 1,2,4 --duration 20 --warmup 5 --limit 32 \
    --out "$out/$dtype" "$@"
  kill "$server"
  wait "$server" 2>/dev/null || true
done
# Different dtypes are different figures on purpose here: --force says so above the table.
$py -m loadgen compare "$out/float32" "$out/bfloat16" --out "$out/compare" \
  --slo-p99-ms 3000 --force
