#!/usr/bin/env bash
# Dense CPU benchmark of issue 2: prompt and decode tokens/s of the shipped
# stories260K model and of a larger random-weight f32 Llama (768 wide, 12
# layers, 32k vocabulary: 134M parameters, 512 MiB), with the decode floor.
# Usage: bash bench/cpu_dense.sh [THREADS, default "1,2"]
# Copy the output into bench/RESULTS.md with the date and the CPU
# (lscpu's model name).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-1,2}
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target optiml-bench optiml-random-model >/dev/null
M=build/bench-f32-768x12.gguf
[ -f "$M" ] || build/bin/optiml-random-model --outfile "$M" --n-embd 768 --n-layer 12 --n-ff 2048 \
  --n-head 12 --n-vocab 32000 --type f32
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
build/bin/optiml-bench -m models/stories260K.gguf -p 128 -n 128 -r 5 -t "$THREADS"
echo
build/bin/optiml-bench -m "$M" -p 128 -n 32 -r 3 -t "$THREADS"
