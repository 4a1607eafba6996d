#!/usr/bin/env bash
# run_c10d_comm_tests.sh — the collectives test for the Comm over torch.distributed (what the
# engine uses inside verl): 1, 2, 3 and 4 ranks under torchrun (gloo, oversubscribed on 2
# cores), closed-form values; then a rank that stalls must make the others fail with the
# watchdog's one line within the timeout, never hang.
#   run_c10d_comm_tests.sh PYTHON MODULE_DIR
set -uo pipefail
PY=$1
DIR=$2
HERE=$(cd "$(dirname "$0")" && pwd)
fail=0
say() { echo "== $*"; }
# --standalone: a free port per launch (other tests start torchrun jobs at the same time); $2 unused.
run() { timeout 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$1" "$HERE/c10d_comm_check.py" "$DIR" "${@:3}"; }

for n in 1 2 3 4; do
  say "torchrun --nproc_per_node $n (gloo)"
  run "$n" $((29600 + n)) collectives || { echo "FAILED at n=$n"; fail=1; }
done

for n in 2 3 4; do
  say "shared-memory comm over gloo, --nproc_per_node $n (with even / odd splits)"
  run "$n" 0 shm_collectives || { echo "FAILED at n=$n"; fail=1; }
  say "the same with 256-byte slots (every collective in many rounds)"
  VERLCPP_SHM_SLOT_BYTES=256 run "$n" 0 shm_collectives || { echo "FAILED at n=$n with small slots"; fail=1; }
done

say "shared-memory comm: a stalled rank makes the others fail within the 3 s watchdog"
log=$(mktemp)
start=$(date +%s)
run 2 0 shm_stall 3 >"$log" 2>&1 &
pid=$!
for _ in $(seq 120); do grep -q "did not complete within 3 s" "$log" && break; sleep 0.5; done
el=$(( $(date +%s) - start ))
pkill -9 -f "c10d_comm_check.py $DIR shm_stall" 2>/dev/null || true
wait $pid; rc=$?
grep "verlcpp" "$log" | head -3
if [[ $rc -eq 0 ]]; then echo "FAILED: rc=0 (no error)"; fail=1; fi
if ! grep -q "did not complete within 3 s" "$log"; then echo "FAILED: no watchdog message"; fail=1; fi
if (( el > 30 )); then echo "FAILED: the watchdog took ${el}s"; fail=1; fi
rm -f "$log"

say "shared-memory comm: a killed rank ends the job at once (timeout 60 s)"
# torchrun itself ends the other ranks when one is killed; whichever comes first (that or
# the comm noticing the exit), the job must end non-zero well before the 60 s watchdog.
start=$(date +%s)
out=$(run 2 0 shm_die 60 2>&1); rc=$?
el=$(( $(date +%s) - start ))
grep "verlcpp" <<<"$out" | head -3
if [[ $rc -eq 0 ]]; then echo "FAILED: rc=0"; fail=1; fi
if (( el > 40 )); then echo "FAILED: took ${el}s"; fail=1; fi

say "a stalled rank: the others must fail within the 3 s watchdog"
# Rank 1 stops itself (SIGSTOP). torchrun cannot end a stopped process, so once rank 0 has
# failed (or after 60 s) this script kills the stopped rank and torchrun ends non-zero.
log=$(mktemp)
start=$(date +%s)
run 2 29611 stall 3 >"$log" 2>&1 &
pid=$!
for _ in $(seq 120); do grep -q "collective all_reduce over torch.distributed group" "$log" && break; sleep 0.5; done
el=$(( $(date +%s) - start ))
pkill -9 -f "c10d_comm_check.py $DIR stall" 2>/dev/null || true
wait $pid; rc=$?
grep "verlcpp" "$log" | head -3
if [[ $rc -eq 0 ]]; then echo "FAILED: rc=0 (no error)"; fail=1; fi
if ! grep -q "collective all_reduce over torch.distributed group" "$log"; then echo "FAILED: no watchdog message"; fail=1; fi
if (( el > 30 )); then echo "FAILED: the watchdog took ${el}s"; fail=1; fi
echo "watchdog message after ${el}s (timeout 3 s, including start-up)"
rm -f "$log"

[[ $fail -eq 0 ]] && echo "ALL OK"
exit $fail
