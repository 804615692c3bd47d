#!/usr/bin/env bash
# optiml-server load benchmark (issue 6): 32 concurrent streaming clients on
# 8 slots vs 8 clients on 1 slot, loopback only, bounded; prints aggregate
# tokens/s of each and their ratio (target: at least 3x). Runs the load test
# of the test suite with its output shown. Usage: bash bench/server_load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" >/dev/null
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
OPTIML_BIN_DIR="$PWD/build/bin" build/pyenv/bin/python -m pytest -q -s -p no:cacheprovider \
  tests/python/test_server_load.py 2>&1 | grep -E "aggregate|RSS|mean batch|passed|failed"
