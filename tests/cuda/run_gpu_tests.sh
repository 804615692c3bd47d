#!/usr/bin/env bash
# Builds the CUDA backend and runs every GPU test in one go (needs an NVIDIA
# GPU, nvcc and cmake; CI has no GPU, so this is run by hand or through the
# device tool, and its output goes into bench/RESULTS.md):
#   1. kernels against the CPU reference (test_cuda_matmul, test_cuda_ops)
#   2. whole-model logits, GPU layers vs the CPU (test_cuda_model), on the
#      shipped stories260K and on random models in f32/f16/bf16 and every
#      quantized type, with and without CUDA graphs
#   3. stories260K greedy ids equal llama2.c's reference with every -ngl
#   4. compute-sanitizer (memcheck) over the kernel tests and a model run
# Usage: bash tests/cuda/run_gpu_tests.sh [BUILD_DIR]   (ARCH=90 by default)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${1:-$ROOT/build-cuda}
ARCH=${ARCH:-90}
FAILED=()
step() { echo; echo "=== $*"; }
check() { local name=$1; shift; if "$@"; then echo "--- ok: $name"; else echo "--- FAILED: $name"; FAILED+=("$name"); fi; }

step "build (sm_$ARCH)"
cmake -S "$ROOT" -B "$BUILD" -DOPTIML_CUBLAS=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_BUILD_TYPE=Release >/dev/null || exit 1
cmake --build "$BUILD" -j"$(nproc)" 2>&1 | grep -E "error|warning" ; test "${PIPESTATUS[0]}" = 0 || exit 1
BIN=$BUILD/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

step "kernels"
check test_cuda_matmul "$BIN/test_cuda_matmul"
check test_cuda_ops "$BIN/test_cuda_ops"

step "models"
M=$BUILD/gpu-models
mkdir -p "$M"
"$BIN/optiml-random-model" --outfile "$M/r-f32.gguf" --n-embd 256 --n-layer 4 --n-ff 768 --n-head 4 \
  --n-head-kv 2 --n-vocab 1000 --ctx 256 --type f32 --seed 7 >/dev/null || exit 1
"$BIN/optiml-random-model" --outfile "$M/r-relu-f16.gguf" --n-embd 256 --n-layer 3 --n-ff 512 --n-head 4 \
  --n-head-kv 4 --n-vocab 1000 --ctx 256 --type f16 --act relu --seed 8 >/dev/null || exit 1
"$BIN/optiml-random-model" --outfile "$M/r-bf16.gguf" --n-embd 256 --n-layer 2 --n-ff 512 --n-head 2 \
  --n-head-kv 1 --n-vocab 1000 --ctx 256 --type bf16 --seed 9 >/dev/null || exit 1
# qwen2: q/k/v biases and NeoX RoPE
"$BIN/optiml-random-model" --outfile "$M/r-qwen2-f32.gguf" --n-embd 256 --n-layer 3 --n-ff 512 --n-head 4 \
  --n-head-kv 2 --n-vocab 1000 --ctx 256 --type f32 --arch qwen2 --seed 10 >/dev/null || exit 1
QUANT=()
for t in q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k q5_k q6_k; do
  # the quantized model and its weights dequantized to f32 (the exact reference)
  "$BIN/optiml-quantize" --input "$M/r-f32.gguf" --output "$M/r-$t.gguf" --type "$t" >/dev/null 2>&1 \
    && "$BIN/optiml-quantize" --input "$M/r-$t.gguf" --output "$M/r-$t-exact.gguf" --type f32 >/dev/null 2>&1 \
    && QUANT+=("$M/r-$t.gguf:$M/r-$t-exact.gguf") || { echo "quantize $t failed"; FAILED+=("quantize-$t"); }
done
"$BIN/optiml-quantize" --input "$M/r-qwen2-f32.gguf" --output "$M/r-qwen2-q4_k.gguf" --type q4_k >/dev/null 2>&1 \
  && "$BIN/optiml-quantize" --input "$M/r-qwen2-q4_k.gguf" --output "$M/r-qwen2-q4_k-exact.gguf" --type f32 >/dev/null 2>&1 \
  && QUANT+=("$M/r-qwen2-q4_k.gguf:$M/r-qwen2-q4_k-exact.gguf") || { echo "quantize qwen2 failed"; FAILED+=("quantize-qwen2"); }
check model-float "$BIN/test_cuda_model" 1e-2 "$ROOT/models/stories260K.gguf" "$M/r-f32.gguf" \
  "$M/r-relu-f16.gguf" "$M/r-bf16.gguf" "$M/r-qwen2-f32.gguf"
# quantized: the GPU's error against the exact product at most 2x the CPU's
check model-quant "$BIN/test_cuda_model" 2 "${QUANT[@]}"
check model-nograph env OPTIML_NO_CUDA_GRAPH=1 "$BIN/test_cuda_model" 1e-2 "$ROOT/models/stories260K.gguf" "$M/r-f32.gguf"
# the non-default kernel choices (OPTIML_CUDA_TUNE, see src/gpu.c) on a few types
SOME=(); for q in "${QUANT[@]}"; do case $q in *r-q4_0.gguf:*|*r-q4_k.gguf:*|*r-q6_k.gguf:*|*r-q8_0.gguf:*) SOME+=("$q") ;; esac; done
for v in pdl=0 fused=1 fused=2 mmvk=2 att=1 brows=2 brows=8 bthr=128 bthr=256 inq=1 inp=1 chunk=1 attp=2 attp=3 att=3 mmvk=3 mmvk=3,brows=2 mmvk=3,brows=8; do
  check "model-quant-$v" env OPTIML_CUDA_TUNE=$v "$BIN/test_cuda_model" 2 "${SOME[@]}"
done
check model-float-attp1 env OPTIML_CUDA_TUNE=attp=1 "$BIN/test_cuda_model" 1e-2 "$M/r-f32.gguf" "$M/r-relu-f16.gguf"

step "stories260K greedy ids vs llama2.c, every -ngl"
greedy() {
  local ngl=$1 ok=0
  local want_ids
  want_ids=$(grep '^generated_ids:' "$ROOT/tests/data/stories260K_greedy.txt" | head -1 | cut -d' ' -f2-)
  local got
  got=$("$BIN/optiml-cli" -m "$ROOT/models/stories260K.gguf" -p "" --temp 0 -n 256 -ngl "$ngl" --show-ids 2>&1 >/dev/null \
        | grep '^generated_ids:' | cut -d' ' -f2-)
  if [ "$got" = "$want_ids" ]; then echo "ngl $ngl: 256 ids equal"; else echo "ngl $ngl: ids differ"; ok=1; fi
  return $ok
}
for ngl in 0 1 2 3 4 5 6 -1; do check "greedy-ngl$ngl" greedy "$ngl"; done

step "--vram-budget picks the layers that fit"
budget() {
  local gib=$1 want=$2 log
  log=$("$BIN/optiml-cli" -m "$ROOT/models/stories260K.gguf" -p "Once upon a time" --temp 0 -n 16 \
        --vram-budget "$gib" -v 2>&1 >/dev/null | grep "VRAM budget")
  echo "$gib GiB: $log"
  case $log in *"$want"*) return 0 ;; *) return 1 ;; esac
}
check budget-all budget 1000 "5 of 5 layers and the output head fit"
check budget-none budget 0.001 "0 of 5 layers fit"

step "compute-sanitizer"
if command -v compute-sanitizer >/dev/null; then
  check sanitize-ops compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/test_cuda_ops" --quick
  check sanitize-matmul compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/test_cuda_matmul" --quick
  check sanitize-model compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/test_cuda_model" 2 \
    "$M/r-q4_0.gguf:$M/r-q4_0-exact.gguf"
  check sanitize-model-f32 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/test_cuda_model" 1e-2 \
    "$ROOT/models/stories260K.gguf"
else
  echo "compute-sanitizer not found"; FAILED+=(sanitizer-missing)
fi

echo
if [ ${#FAILED[@]} -eq 0 ]; then echo "GPU TESTS: ALL PASSED"; exit 0; fi
echo "GPU TESTS: FAILED: ${FAILED[*]}"; exit 1
