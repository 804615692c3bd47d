#!/usr/bin/env bash
# Builds OptiML and runs every test, in this order:
#   1. the release build and its C tests (ctest)
#   2. an AddressSanitizer + UndefinedBehaviorSanitizer build: the C tests
#      again, the fuzz-corpus replays, and the CLI tests on its binaries
#   3. the Python tests (pytest) against the release build
#   4. short libFuzzer runs of every fuzz target when clang is installed
#      (OPTIML_FUZZ_SECONDS per target, default 20; 0 skips them)
#   5. when nvcc is installed: the CUDA build (-DOPTIML_CUBLAS=ON) compiles,
#      and its C tests pass on this machine without a GPU (the CPU fallback);
#      the GPU tests themselves need a GPU: tests/cuda/run_gpu_tests.sh
# Missing build tools and Python packages are installed first (Debian
# packages when run as root; Python packages into build/pyenv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
JOBS=$(nproc 2>/dev/null || echo 2)
FUZZ_SECONDS=${OPTIML_FUZZ_SECONDS:-20}

step() { printf '\n==== %s\n' "$*"; }

step "dependencies"
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v cc >/dev/null || missing+=(build-essential)
command -v pkg-config >/dev/null || missing+=(pkg-config)
pkg-config --exists jansson 2>/dev/null || missing+=(libjansson-dev)
pkg-config --exists libmicrohttpd 2>/dev/null || missing+=(libmicrohttpd-dev) # optiml-server
[ -f /usr/include/xxhash.h ] || missing+=(libxxhash-dev) # optiml-synth, -profile, -train-predictor
command -v chromium >/dev/null || missing+=(chromium) # the web UI browser test
command -v curl >/dev/null || missing+=(curl)
command -v clang >/dev/null || missing+=(clang)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing: ${missing[*]} (install them, e.g. apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi
PY=build/pyenv/bin/python
[ -x "$PY" ] || { mkdir -p build && python3 -m venv --system-site-packages build/pyenv; }
"$PY" -m pip install -q --disable-pip-version-check -r tests/requirements.txt
"$PY" -m pip install -q --disable-pip-version-check --no-deps -r tests/requirements-nodeps.txt

step "release build + C tests"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$JOBS"
ctest --test-dir build --output-on-failure -j "$JOBS"

step "sanitizer build (ASan + UBSan) + C tests + corpus replays + CLI tests"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DOPTIML_SANITIZE=ON >/dev/null
cmake --build build-asan -j "$JOBS"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir build-asan --output-on-failure -j "$JOBS"
OPTIML_BIN_DIR="$ROOT/build-asan/bin" "$PY" -m pytest -q -p no:cacheprovider tests/python/test_cli.py
if [ -x build-asan/bin/optiml-server ]; then # the server under the sanitizers (leaks checked at its exit)
  OPTIML_BIN_DIR="$ROOT/build-asan/bin" "$PY" -m pytest -q -p no:cacheprovider tests/python/test_server.py
fi

if [ "$FUZZ_SECONDS" != 0 ] && command -v clang >/dev/null; then
  step "libFuzzer, ${FUZZ_SECONDS}s per target"
  CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DOPTIML_SANITIZE=ON -DOPTIML_FUZZ=ON \
    -DOPTIML_BUILD_TESTS=OFF -DOPTIML_BUILD_TOOLS=OFF >/dev/null
  cmake --build build-fuzz -j "$JOBS"
  for target in build-fuzz/bin/fuzz_*; do
    name=$(basename "$target")
    corpus="fuzz/corpus/${name#fuzz_}"
    work=$(mktemp -d)
    [ -d "$corpus" ] && cp -r "$corpus"/. "$work"/
    echo "$name: ${FUZZ_SECONDS}s"
    "$target" -max_total_time="$FUZZ_SECONDS" -max_len=65536 -print_final_stats=0 "$work" \
      >"build-fuzz/$name.log" 2>&1 || { tail -40 "build-fuzz/$name.log"; exit 1; }
    rm -rf "$work"
  done
fi

if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  step "CUDA build (compiles here; GPU tests: tests/cuda/run_gpu_tests.sh on a GPU machine)"
  export PATH="$PATH:/usr/local/cuda/bin"
  cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DOPTIML_CUBLAS=ON -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
  cmake --build build-cuda -j "$JOBS"
  ctest --test-dir build-cuda --output-on-failure -j "$JOBS"
fi

step "Python tests"
OPTIML_BIN_DIR="$ROOT/build/bin" "$PY" -m pytest -q -p no:cacheprovider tests/python
