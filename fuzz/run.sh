#!/usr/bin/env bash
# fuzz/run.sh — build the libFuzzer targets with clang (ASan + UBSan) and run each for
# FUZZ_SECONDS (default 60). Corpora live in build-fuzz/corpus/<target> (not committed);
# fuzz_dcp's corpus is seeded from real torch dcp.save checkpoints (make_dcp_seeds.py).
#   FUZZ_TARGETS="pickle zip safetensors dcp" (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-pickle zip safetensors dcp}
PY=${VERLCPP_VENV:-/opt/verlcpp/venv}/bin/python
CXX=$(command -v clang++ || command -v clang++-14)
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$CXX" \
  -DVERLCPP_FUZZ=ON -DVERLCPP_TESTS=OFF -DVERLCPP_WITH_TORCH=OFF \
  -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link,address,undefined" >/dev/null
cmake --build build-fuzz --target $(for t in $targets; do printf 'fuzz_%s ' "$t"; done)
for t in $targets; do
  mkdir -p build-fuzz/corpus/$t
  if [[ $t == dcp && -z $(ls -A build-fuzz/corpus/dcp) && -x $PY ]]; then
    "$PY" fuzz/make_dcp_seeds.py build-fuzz/corpus/dcp 2>/dev/null | tail -1
  fi
  echo "fuzzing $t for ${secs}s"
  build-fuzz/fuzz_$t -max_total_time="$secs" -print_final_stats=1 build-fuzz/corpus/$t 2>&1 | grep -E "stat::number_of_executed_units|ERROR|SUMMARY" || true
done
