#!/usr/bin/env bash
# run_comm_tests.sh — the collectives test: comm_check on 1 process without mpirun (the
# single-process comm), then under mpirun with 1, 2, 3 and 4 ranks (oversubscribed on this
# 2-core machine), then the failure cases: a rank that stalls and a rank that dies must make
# the job end non-zero, with the watchdog's message, well within the time limit.
set -uo pipefail
BIN=$1
fail=0
say() { echo "== $*"; }
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none)
export OMPI_MCA_btl_vader_single_copy_mechanism=none  # containers often forbid CMA

say "single process, no MPI"
"$BIN" collectives --backend local || fail=1

if ! command -v mpirun >/dev/null; then echo "mpirun not found"; exit 1; fi
for n in 1 2 3 4; do
  say "mpirun -np $n (shared-memory comm over MPI)"
  timeout 120 "${MPIRUN[@]}" -np "$n" "$BIN" collectives || { echo "FAILED at np=$n"; fail=1; }
  say "mpirun -np $n, 256-byte slots (every collective in many rounds)"
  timeout 120 "${MPIRUN[@]}" -np "$n" -x VERLCPP_SHM_SLOT_BYTES=256 "$BIN" collectives || { echo "FAILED at np=$n, small slots"; fail=1; }
  say "mpirun -np $n, MPI alone (VERLCPP_SHM=0)"
  timeout 120 "${MPIRUN[@]}" -np "$n" -x VERLCPP_SHM=0 "$BIN" collectives || { echo "FAILED at np=$n, MPI alone"; fail=1; }
done

for label in shm mpi; do
  MODE=(-x VERLCPP_SHM=1)
  [[ $label == mpi ]] && MODE=(-x VERLCPP_SHM=0)
  say "a stalled rank ($label): the others must abort within the 3 s watchdog"
  start=$(date +%s)
  out=$(timeout 60 "${MPIRUN[@]}" "${MODE[@]}" -np 2 "$BIN" stall --timeout 3 2>&1); rc=$?
  el=$(( $(date +%s) - start ))
  echo "$out" | grep -v "^\s*$" | head -5
  if [[ $rc -eq 0 || $rc -eq 124 ]]; then echo "FAILED: rc=$rc (0 = no error, 124 = hung)"; fail=1; fi
  if ! grep -q "did not complete within 3 s" <<<"$out"; then echo "FAILED: no watchdog message"; fail=1; fi
  if (( el > 30 )); then echo "FAILED: took ${el}s"; fail=1; fi
  # A stopped rank may outlive mpirun: clean it up.
  pkill -9 -f "$BIN stall" 2>/dev/null || true

  say "a killed rank ($label): the job must end non-zero"
  start=$(date +%s)
  out=$(timeout 60 "${MPIRUN[@]}" "${MODE[@]}" -np 2 "$BIN" die --timeout 5 2>&1); rc=$?
  el=$(( $(date +%s) - start ))
  echo "$out" | grep -v "^\s*$" | head -5
  if [[ $rc -eq 0 || $rc -eq 124 ]]; then echo "FAILED: rc=$rc"; fail=1; fi
  if (( el > 30 )); then echo "FAILED: took ${el}s"; fail=1; fi
done

[[ $fail -eq 0 ]] && echo "ALL OK"
exit $fail
