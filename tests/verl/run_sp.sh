#!/usr/bin/env bash
# Ulysses sequence parallelism inside verl: verl's own sft_trainer (verl/trainer/sft_trainer.py, the
# engine-based trainer) with engine=verlcpp and engine.ulysses_sequence_parallel_size=2, against the
# same trainer with engine=verlcpp at sp=1 (verl's own fsdp2 Ulysses needs flash-attn, so it cannot be
# the reference on the CPU). What verl's FSDPEngine does with sp is what VerlcppEngine does: a
# ("dp", "sp") DeviceMesh, the data split over its "dp" dimension, each micro-batch's packed row
# sliced over "sp", outputs gathered back. The runs see the same samples per step (verl's
# DistributedSampler over dp ranks), so per-step train/loss and train/grad_norm must agree
# (compare.py, fp32, rel <= 1e-4), and so must train/global_tokens and train/lr.
#
#   tests/verl/run_sp.sh OUTDIR
#
# Cases (VERL_SP_CASES, default "sp2 sp2_dyn bad"; add sp2dp2 for 4 ranks):
#   sp2      2 ranks, sp=2 (dp=1)            vs sp=1 over 2 ranks (dp=2), fixed micro-batches
#   sp2_dyn  the same with dynamic micro-batches (budget max_token_len_per_gpu x sp, verl's rule)
#   sp2dp2   4 ranks, sp=2 x dp=2            vs sp=1 over 2 ranks
#   bad      sp=3 over 2 ranks, and sp=2 on a copy of the model with 3 attention heads: each run fails
#            with one line naming the setting (checked here)
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${VERLCPP_VENV:-/opt/verlcpp/venv}/bin/python
CASES=${VERL_SP_CASES:-sp2 sp2_dyn bad}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export VERL_FIXTURE=$OUT/fixture
if [ ! -f "$VERL_FIXTURE/fixture.json" ]; then
  "$PY" "$HERE/make_fixture.py" "$VERL_FIXTURE" > "$OUT/fixture.log" 2>&1 || { cat "$OUT/fixture.log" >&2; exit 1; }
fi
DYN=(data.use_dynamic_bsz=True data.max_token_len_per_gpu=512)

ref() {  # $1 name, rest: overrides -> the sp=1 reference over 2 ranks (run now; made once per invocation)
  local name=$1
  shift
  case " $MADE " in *" $name "*) return ;; esac
  "$HERE/run_sft.sh" verlcpp "$OUT/$name" "$@" > /dev/null
  MADE="$MADE $name"
}
MADE=""

# the engine really ran with sequence parallelism: its start-up line in the run's log
check_layout() {  # $1 outdir, $2 expected "sp=N, dp=M"
  grep -q "verlcpp engine: .*ulysses $2," "$1/log.txt" || {
    echo "run_sp.sh: $1/log.txt has no 'verlcpp engine: ... ulysses $2' line" >&2
    exit 1
  }
}

source "$HERE/expect_failure.sh"

for c in $CASES; do
  t0=$(date +%s)
  case "$c" in
    sp2)
      ref sp1
      "$HERE/run_sft.sh" verlcpp "$OUT/sp2" engine.ulysses_sequence_parallel_size=2 > /dev/null
      check_layout "$OUT/sp2" "sp=2, dp=1"
      "$PY" "$HERE/compare.py" -q "$OUT/sp1" "$OUT/sp2" ;;
    sp2_dyn)
      ref sp1_dyn "${DYN[@]}"
      "$HERE/run_sft.sh" verlcpp "$OUT/sp2_dyn" engine.ulysses_sequence_parallel_size=2 "${DYN[@]}" > /dev/null
      check_layout "$OUT/sp2_dyn" "sp=2, dp=1"
      "$PY" "$HERE/compare.py" -q "$OUT/sp1_dyn" "$OUT/sp2_dyn" ;;
    sp2dp2)
      ref sp1
      SFT_NPROC=4 "$HERE/run_sft.sh" verlcpp "$OUT/sp2dp2" engine.ulysses_sequence_parallel_size=2 > /dev/null
      check_layout "$OUT/sp2dp2" "sp=2, dp=2"
      "$PY" "$HERE/compare.py" -q "$OUT/sp1" "$OUT/sp2dp2" ;;
    bad)
      mkdir -p "$OUT/bad"
      expect_failure "$OUT/bad/sp3" "ulysses_sequence_parallel_size=3 must be >= 1 and divide the world size (2 ranks)" \
        "$HERE/run_sft.sh" verlcpp "$OUT/bad/sp3" engine.ulysses_sequence_parallel_size=3
      # the fixture with a model of 3 attention heads (1 kv head): only config.json differs
      BADFIX=$OUT/bad/fixture_3heads
      if [ ! -f "$BADFIX/fixture.json" ]; then
        rm -rf "$BADFIX"
        mkdir -p "$BADFIX"
        cp -r "$VERL_FIXTURE/model" "$BADFIX/model"
        ln -s "$VERL_FIXTURE/data" "$BADFIX/data"
        "$PY" - "$BADFIX/model/config.json" <<'EOF'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c.update(num_attention_heads=3, num_key_value_heads=1, head_dim=c["hidden_size"] // c["num_attention_heads"])
json.dump(c, open(p, "w"), indent=1)
EOF
        cp "$VERL_FIXTURE/fixture.json" "$BADFIX/fixture.json"
      fi
      expect_failure "$OUT/bad/heads" "the model's num_attention_heads (3) must be divisible by it" \
        VERL_FIXTURE="$BADFIX" "$HERE/run_sft.sh" verlcpp "$OUT/bad/heads" engine.ulysses_sequence_parallel_size=2 ;;
    *) echo "run_sp.sh: unknown case $c" >&2; exit 2 ;;
  esac
  echo "run_sp.sh: $c ok ($(( $(date +%s) - t0 )) s)"
done
