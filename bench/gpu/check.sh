#!/usr/bin/env bash
# bench/gpu/check.sh — the one prepared script for a lent GPU machine (issue 11 §2): builds the
# verlcpp CLI against the machine's own torch (2.11, CUDA 13), then runs bench/gpu/check.py:
# parity on the GPU (log-probs vs transformers, bf16 flash vs SDPA, 2 training steps vs the CPU)
# and a 0.5B-shaped bf16 training step beside a plain FSDP2 loop (tokens/s, peak memory, MFU).
# Needs no MPI and no network; results go to $OUT (gpu_check.json, check.log, build.log).
#
# The GPU machine has no Debian -dev packages: run bench/gpu/pack_deps.sh here first, which
# downloads the few the build needs into .gpu-deps/ (git-ignored); name .gpu-deps in the device
# tool's `carry`. Usage there:   bash bench/gpu/check.sh    (about 5-7 minutes on one H100)
#   CHECK_ARGS="--skip speed"   extra arguments for check.py
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/verlcpp-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
t0=$(date +%s)
say() { echo "[check.sh $(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/check.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/check.log"
# 1. Build dependencies carried as .deb files, unpacked into a private prefix (never into /).
if compgen -G ".gpu-deps/*.deb" >/dev/null; then
  mkdir -p /tmp/verlcpp-deps
  for f in .gpu-deps/*.deb; do dpkg -x "$f" /tmp/verlcpp-deps; done
  export CMAKE_PREFIX_PATH=/tmp/verlcpp-deps/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
  export LD_LIBRARY_PATH=/tmp/verlcpp-deps/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  say "unpacked $(ls .gpu-deps/*.deb | wc -l) .deb files into /tmp/verlcpp-deps"
fi
# 2. Build the CLI (tests and the Python module are not needed here).
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
say "configuring"
if ! cmake -S . -B build-gpu "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DVERLCPP_TESTS=OFF -DVERLCPP_PYTHON_MODULE=OFF \
     -DVERLCPP_PYTHON="$(command -v "$PY")" >"$OUT/build.log" 2>&1 ||
   ! cmake --build build-gpu --target verlcpp -j"$(nproc)" >>"$OUT/build.log" 2>&1; then
  say "BUILD FAILED (tail of build.log follows)"
  tail -40 "$OUT/build.log"
  exit 2
fi
say "built build-gpu/verlcpp"
# 3. The checks.
PYTHONUNBUFFERED=1 "$PY" bench/gpu/check.py --verlcpp build-gpu/verlcpp --out "$OUT" ${CHECK_ARGS:-} 2>&1 | tee -a "$OUT/check.log"
rc=${PIPESTATUS[0]}
say "done, exit $rc"
exit "$rc"
