#!/usr/bin/env bash
# Sparse CPU decode (issue 5): a 7B-shaped synthetic ReLU-sparse q4_0 model
# (optiml-synth: 90% of the FFN neurons inactive per token, predictors
# included; 3.9 GB on disk, about 3 minutes to write on one core), decoded
# dense (--sparse-mode 1) and with its predictors (3) in the same run, so
# the speed-up compares like with like: the two modes take turns run by run
# and the line after the table gives sparse over dense, round by round. The
# test names carry the share of FFN neurons the last step computed.
# Usage: bash bench/cpu_sparse.sh [THREADS, default all cores] [SHAPE, default 7b]
#   SHAPE "small" (1024 wide, 8 layers, 2816 FFN: 50 MB) checks the setup
#   quickly. The model is kept in build/ for the next run.
# Copy the output into bench/RESULTS.md with the date and the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-$(nproc)}
SHAPE=${2:-7b}
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target optiml-bench optiml-synth >/dev/null
if [ "$SHAPE" = small ]; then
  M=build/bench-synth-small-q4_0.gguf
  FLAGS=(--n-embd 1024 --n-layer 8 --n-ff 2816 --n-head 16 --vocab 4000)
else
  M=build/bench-synth-$SHAPE-q4_0.gguf
  FLAGS=(--shape "$SHAPE")
fi
[ -f "$M" ] || build/bin/optiml-synth --outfile "$M" "${FLAGS[@]}" --type q4_0 --sparsity 0.9 --hot-share 0.8
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
build/bin/optiml-bench -m "$M" -p 0 -n 32 -r 3 -t "$THREADS" --sparse-mode 1,3
