#!/usr/bin/env bash
# fuzz/run.sh — build the libFuzzer targets with clang (ASan + UBSan) and run each for
# FUZZ_SECONDS (default 60). Corpora live in build-fuzz/corpus/<target> (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
CXX=$(command -v clang++ || command -v clang++-14)
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$CXX" \
  -DVERLCPP_FUZZ=ON -DVERLCPP_TESTS=OFF -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link,address,undefined" >/dev/null
cmake --build build-fuzz --target fuzz_pickle fuzz_zip fuzz_safetensors
for t in pickle zip safetensors; do
  mkdir -p build-fuzz/corpus/$t
  echo "fuzzing $t for ${secs}s"
  build-fuzz/fuzz_$t -max_total_time="$secs" -print_final_stats=1 build-fuzz/corpus/$t 2>&1 | grep -E "stat::number_of_executed_units|ERROR|SUMMARY" || true
done
