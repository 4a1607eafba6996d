#!/usr/bin/env bash
# The whole verl-on-CPU comparison: verl's own sft_trainer and TrainingWorker run with strategy A and
# with strategy B on the same fixture, and tests/verl/compare.py checks they agree (fp32: losses and
# grad norms rel <= 1e-4, log-probs/entropy/values abs <= 1e-5, parameters rel <= 1e-4).
#
#   tests/verl/run_all.sh A B OUTDIR        e.g.  tests/verl/run_all.sh fsdp2 verlcpp /tmp/verl_cmp
#
# Cases: sft (fixed micro-batches), sft_dyn (dynamic), sft_resume (save at step 2, resume to 3),
# sft_hsdp (engine.fsdp_size=1 over 2 ranks: hybrid sharding, one replica per rank),
# worker (fixed), worker_dyn (dynamic). Each strategy's resumed SFT run is also checked against its
# own uninterrupted run. VERL_CASES="sft worker" runs a subset. Exits non-zero on the first failure.
set -euo pipefail
if [ $# -ne 3 ]; then
  echo "usage: $0 STRATEGY_A STRATEGY_B OUTDIR" >&2
  exit 2
fi
A=$1
B=$2
OUT=$3
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${VERLCPP_VENV:-/opt/verlcpp/venv}/bin/python
CASES=${VERL_CASES:-sft sft_dyn sft_resume worker worker_dyn}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export VERL_FIXTURE=$OUT/fixture
if [ ! -f "$VERL_FIXTURE/fixture.json" ]; then
  "$PY" "$HERE/make_fixture.py" "$VERL_FIXTURE" > "$OUT/fixture.log" 2>&1 || { cat "$OUT/fixture.log" >&2; exit 1; }
fi

run_case() {  # $1 case, $2 strategy, $3 outdir
  case "$1" in
    sft)        "$HERE/run_sft.sh" "$2" "$3" ;;
    sft_dyn)    "$HERE/run_sft.sh" "$2" "$3" data.use_dynamic_bsz=True data.max_token_len_per_gpu=512 ;;
    sft_resume) SFT_RESUME_AT=2 "$HERE/run_sft.sh" "$2" "$3" ;;
    sft_hsdp)   "$HERE/run_sft.sh" "$2" "$3" engine.fsdp_size=1 ;;
    worker)     "$HERE/run_worker.sh" "$2" "$3" > /dev/null ;;
    worker_dyn) "$HERE/run_worker.sh" "$2" "$3" --dynamic > /dev/null ;;
    *) echo "unknown case $1" >&2; return 2 ;;
  esac
}

for c in $CASES; do
  t0=$(date +%s)
  run_case "$c" "$A" "$OUT/$c/A-$A"
  run_case "$c" "$B" "$OUT/$c/B-$B"
  "$PY" "$HERE/compare.py" -q "$OUT/$c/A-$A" "$OUT/$c/B-$B"
  if [ "$c" = sft_resume ] && [ -d "$OUT/sft/A-$A" ]; then
    "$PY" "$HERE/compare.py" -q "$OUT/sft/A-$A" "$OUT/sft_resume/A-$A"
    "$PY" "$HERE/compare.py" -q "$OUT/sft/B-$B" "$OUT/sft_resume/B-$B"
  fi
  echo "run_all.sh: $c: $A vs $B agree ($(( $(date +%s) - t0 )) s)"
done
