#!/usr/bin/env bash
# Quantized CPU benchmark of issue 8: a Llama-7B-shaped model (4096 wide, 32
# layers, n_ff 11008, 32k vocabulary) with random weights, written as f16
# by optiml-random-model and quantized with optiml-quantize to q4_0 and
# q4_k; prompt and decode tokens/s with the decode bandwidth floor.
# Needs ~22 GB of disk under build/. Usage: bash bench/cpu_quant.sh [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-$(nproc)}
P=${OPTIML_BENCH_PROMPT:-128}
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target optiml-bench optiml-random-model optiml-quantize >/dev/null
F16=build/bench-7b-f16.gguf
[ -f "$F16" ] || build/bin/optiml-random-model --outfile "$F16" --n-embd 4096 --n-layer 32 --n-ff 11008 \
  --n-head 32 --n-vocab 32000 --type f16
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
for type in q4_0 q4_k; do
  Q=build/bench-7b-$type.gguf
  if [ ! -f "$Q" ]; then
    start=$(date +%s)
    build/bin/optiml-quantize --input "$F16" --output "$Q" --type "$type" --threads "$(nproc)" 2>/dev/null
    echo "quantized to $type in $(( $(date +%s) - start )) s"
  fi
  build/bin/optiml-bench -m "$Q" -p "$P" -n 32 -r 3 -t "$THREADS"
  echo
done
