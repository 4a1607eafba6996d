#!/usr/bin/env bash
# Runs tests/verl/worker_driver.py (verl's TrainingWorker driven in-process) under
# `torchrun --nproc_per_node 2` on the CPU, with the fixture of tests/verl/make_fixture.py.
#
#   tests/verl/run_worker.sh STRATEGY OUTDIR [worker_driver.py options, e.g. --dynamic]
#
# Output: OUTDIR/worker.json, OUTDIR/worker_tensors.pt (see worker_driver.py), OUTDIR/worker_log.txt.
# Environment: VERLCPP_VENV (default /opt/verlcpp/venv), VERL_FIXTURE (default OUTDIR/fixture; made if
# missing), WORKER_TIMEOUT (seconds, default 300).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 STRATEGY OUTDIR [worker_driver.py options]" >&2
  exit 2
fi
STRATEGY=$1
OUT=$2
shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
rm -f "$OUT/worker.json" "$OUT/worker_tensors.pt"
status=0
timeout --kill-after=10 "${WORKER_TIMEOUT:-300}" "$VENV/bin/torchrun" --standalone --nproc_per_node 2 \
  "$HERE/worker_driver.py" "$STRATEGY" "$OUT" --fixture "$FIX" "$@" > "$OUT/worker_log.txt" 2>&1 || status=$?
grep '^\[worker_driver\]' "$OUT/worker_log.txt" || true
if [ $status -ne 0 ]; then
  echo "run_worker.sh: worker_driver.py with strategy=$STRATEGY failed (exit $status); last lines of $OUT/worker_log.txt:" >&2
  grep -v '^\s*$' "$OUT/worker_log.txt" | grep -v '^\[worker_driver\]' | grep -v '^\[rank[0-9]*\]:' | tail -12 >&2
  # the rank's own exception (torchrun's summary above only says which rank failed)
  grep -m1 -E '^(\[rank[0-9]+\]: )?[A-Za-z_.]*(Error|Exception): ' "$OUT/worker_log.txt" | grep -v ChildFailedError >&2 || true
  exit $status
fi
