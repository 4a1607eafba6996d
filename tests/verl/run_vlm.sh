#!/usr/bin/env bash
# A vision-language model through verl's TrainingWorker with strategy=verlcpp (tests/verl/vlm_driver.py)
# under `torchrun --nproc_per_node 2` on the CPU: makes the fixture and the transformers + AdamW
# reference (tests/oracle/vlm_train_ref.py make / ref), runs the driver (log-probs and entropy vs
# transformers, three SFT steps with verl's sft_loss), then checks the exported parameters against the
# reference (vlm_train_ref.py check, rel <= 3e-5 as the verlcpp train test; they must load in transformers with no missing key).
#
#   tests/verl/run_vlm.sh FAMILY OUTDIR [vlm_driver.py options, e.g. --sp 2]
#   FAMILY: qwen2_vl | qwen2_5_vl. Environment: VERLCPP_VENV, WORKER_TIMEOUT (seconds, default 300),
#   NPROC (ranks, default 2; 4 with --sp 2 is sp=2 x dp=2).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 qwen2_vl|qwen2_5_vl OUTDIR [vlm_driver.py options]" >&2
  exit 2
fi
FAMILY=$1
OUT=$2
shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NO_TEXT_FIXTURE=1 source "$HERE/common.sh"
ORACLE=$ROOT/tests/oracle/vlm_train_ref.py
FIX=$OUT/fixture  # the VLM fixture, made below
export HF_HUB_OFFLINE=1
run() {  # $1 log name, rest: command; shows the log's tail on failure
  local name=$1
  shift
  "$@" > "$OUT/$name.log" 2>&1 || {
    local s=$?
    echo "run_vlm.sh: $name failed (exit $s); last lines of $OUT/$name.log:" >&2
    grep -v '^\s*$' "$OUT/$name.log" | grep -v '^\[rank[0-9]*\]:' | tail -15 >&2
    exit $s
  }
}
if [ ! -f "$FIX/ref_3.json" ]; then
  run fixture "$PY" "$ORACLE" make --out "$FIX" --family "$FAMILY" --seqs 8
  run reference "$PY" "$ORACLE" ref --out "$FIX" --steps 3 --bs 4 --lr 1e-3
fi
rm -rf "$OUT/exported" "$OUT/vlm.json"
run driver timeout --kill-after=10 "${WORKER_TIMEOUT:-300}" "$VENV/bin/torchrun" --standalone --nproc_per_node "${NPROC:-2}" \
  "$HERE/vlm_driver.py" "$OUT" --fixture "$FIX" "$@"
grep '^\[vlm_driver\]' "$OUT/driver.log"
run check "$PY" "$ORACLE" check --merged "$OUT/exported" --ref "$FIX/ref_3" --rtol 3e-5
cat "$OUT/check.log"
echo "run_vlm.sh: $FAMILY $* passed"
