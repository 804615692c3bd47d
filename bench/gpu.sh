#!/usr/bin/env bash
# GPU benchmark of issue 4 (run on the GPU machine; figures go into
# bench/RESULTS.md with the card and date):
#   1. kernel level (bench_cuda_matmul): device copy bandwidth (the HBM
#      ceiling), matrix-vector GB/s per type, prompt GEMM path vs plain
#      cuBLAS f16 on the same shapes
#   2. model level: Llama-7B- and 13B-shaped Q4_0 models with random
#      weights (optiml-random-model --type q4_0); full offload
#      pp512 + tg128, then decode with -ngl at 0/25/50/75/100% of layers.
#      The decode floor = weight bytes per token / measured copy bandwidth.
# Usage: bash bench/gpu.sh [BUILD_DIR] [SHAPES]   (SHAPES default "7b 13b")
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-$ROOT/build-cuda}
SHAPES=${2:-7b 13b}
ARCH=${ARCH:-90}
cmake -S "$ROOT" -B "$BUILD" -DOPTIML_CUBLAS=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_BUILD_TYPE=Release >/dev/null || exit 1
cmake --build "$BUILD" -j"$(nproc)" >/dev/null || exit 1
BIN=$BUILD/bin
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"

echo; echo "=== kernels"
"$BIN/bench_cuda_matmul"

DIR=${BENCH_DIR:-$BUILD/bench-models}
mkdir -p "$DIR"
for shape in $SHAPES; do
  case $shape in
    7b) dims="--n-embd 4096 --n-layer 32 --n-ff 11008 --n-head 32"; NL=32 ;;
    13b) dims="--n-embd 5120 --n-layer 40 --n-ff 13824 --n-head 40"; NL=40 ;;
    *) echo "unknown shape $shape"; exit 1 ;;
  esac
  Q=$DIR/$shape-q4_0.gguf
  if [ ! -f "$Q" ]; then
    t0=$(date +%s)
    # shellcheck disable=SC2086
    "$BIN/optiml-random-model" --outfile "$Q" $dims --n-vocab 32000 --type q4_0 >/dev/null || exit 1
    echo "made $Q in $(( $(date +%s) - t0 )) s"
  fi
  echo; echo "=== $shape q4_0: full offload"
  "$BIN/optiml-bench" -m "$Q" -p 512 -n 128 -r 3 -ngl $((NL + 1)) -t "$(nproc)"
  echo; echo "=== $shape q4_0: decode with part of the layers on the GPU"
  for frac in 0 25 50 75; do
    ngl=$(( NL * frac / 100 ))
    "$BIN/optiml-bench" -m "$Q" -p 0 -n 16 -r 2 -ngl "$ngl" -t "$(nproc)" --no-floor | grep tg
  done
done
