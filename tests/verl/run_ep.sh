#!/usr/bin/env bash
# Expert parallelism inside verl: verl's own sft_trainer (verl/trainer/sft_trainer.py, the engine-based
# trainer) on a tiny Qwen3-MoE (tests/verl/make_moe_fixture.py: 8 experts, top-2, a dense layer between
# two sparse ones) with the verl.cpp engine at expert_parallel_size=2, against the same trainer with
# verl's own fsdp2 engine (its FSDPEngine has no expert parallelism: every rank holds a shard of every
# expert), on the same data. Expert parallelism changes where the experts live and how tokens reach
# them (an all-to-all to the rank holding the expert and back), not what is computed, so per-step
# train/loss and train/grad_norm must agree (compare.py, fp32, rel <= 1e-4), and so must
# train/global_tokens and train/lr.
#
#   tests/verl/run_ep.sh OUTDIR
#
# Cases (VERL_EP_CASES, default "ep2 ep2_veomni worker_ep2 bad"; add ep2dp2 for 4 ranks):
#   ep2         2 ranks, engine=verlcpp engine.expert_parallel_size=2 (the FSDP-shaped config)
#   ep2_veomni  2 ranks, engine=verlcpp_veomni engine.expert_parallel_size=2 optim=veomni: verl's
#               VeOmni-shaped engine and optimizer configs (VeOmniEngineConfig / VeOmniOptimizerConfig
#               fields) driving the same engine, with basic_modules naming the model's decoder-layer
#               class (transformers' _no_split_modules, already a unit)
#   worker_ep2  verl's TrainingWorker driven in-process (tests/verl/worker_driver.py --ep 2): actor
#               log-probs / entropy and critic values vs transformers (1e-5), get_per_tensor_param right
#               after initialisation == the HF weights (every expert on every rank), two PPO steps and a
#               critic step, and every parameter after them, against the same driver with fsdp2
#               (rel <= 1e-4) and with the verlcpp engine at ep = 1 (rel <= 1e-5)
#   ep2dp2      4 ranks, ep=2 x 2 expert-data ranks (each expert FSDP-sharded over 2 ranks), vs the
#               2-rank fsdp2 reference (the same global batch)
#   bad         expert_parallel_size=3 over 2 ranks; ep=2 on the dense fixture; a VeOmni setting verl.cpp
#               does not implement (basic_modules or FSDP's wrap_policy.transformer_layer_cls_to_wrap
#               naming a class inside the layer, init_device=cuda, a kernel selector): each run fails
#               with one line naming the setting (checked here)
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${VERLCPP_VENV:-/opt/verlcpp/venv}/bin/python
CASES=${VERL_EP_CASES:-ep2 ep2_veomni worker_ep2 bad}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DENSE=$OUT/fixture_dense
MOE=$OUT/fixture_moe
if [ ! -f "$DENSE/fixture.json" ]; then
  "$PY" "$HERE/make_fixture.py" "$DENSE" > "$OUT/fixture.log" 2>&1 || { cat "$OUT/fixture.log" >&2; exit 1; }
fi
if [ ! -f "$MOE/fixture.json" ]; then
  "$PY" "$HERE/make_moe_fixture.py" "$DENSE" "$MOE" > "$OUT/fixture_moe.log" 2>&1 || { cat "$OUT/fixture_moe.log" >&2; exit 1; }
fi
export VERL_FIXTURE=$MOE

# verl's fsdp2 engine on the MoE fixture, over 2 ranks (made once per invocation)
REF=$OUT/ref_fsdp2
ref() {
  [ -f "$REF/metrics.jsonl" ] && [ -n "${REF_MADE:-}" ] && return
  "$HERE/run_sft.sh" fsdp2 "$REF" > /dev/null
  REF_MADE=1
}

# the engine really ran with expert parallelism: its start-up line in the run's log
check_layout() {  # $1 outdir, $2 expected "dp=N, expert parallel ep=M", $3 log file (default log.txt)
  grep -q "verlcpp engine: .* $2," "$1/${3:-log.txt}" || {
    echo "run_ep.sh: $1/${3:-log.txt} has no 'verlcpp engine: ... $2' line" >&2
    exit 1
  }
}

source "$HERE/expect_failure.sh"

for c in $CASES; do
  t0=$(date +%s)
  case "$c" in
    ep2)
      ref
      # wrap_policy names the model's own decoder-layer class, as transformers declares it (verl's FSDP2
      # wraps exactly those; it is the unit here)
      layer_cls=$("$PY" -c "import transformers; print(','.join(transformers.Qwen3MoeForCausalLM._no_split_modules))")
      "$HERE/run_sft.sh" verlcpp "$OUT/ep2" engine.expert_parallel_size=2 \
        "+engine.wrap_policy.transformer_layer_cls_to_wrap=[$layer_cls]" > /dev/null
      check_layout "$OUT/ep2" "dp=2, expert parallel ep=2"
      "$PY" "$HERE/compare.py" -q "$REF" "$OUT/ep2" ;;
    ep2_veomni)
      ref
      # run_sft.sh's fp32 mixed_precision dict and use_torch_compile override apply to this shape too;
      # basic_modules names the model's own no-split unit, as transformers declares it (VeOmni takes the union)
      layer_cls=$("$PY" -c "import transformers; print(','.join(transformers.Qwen3MoeForCausalLM._no_split_modules))")
      "$HERE/run_sft.sh" verlcpp_veomni "$OUT/ep2_veomni" engine.expert_parallel_size=2 \
        optim=veomni optim.lr_scheduler_type=constant engine.init_device=meta engine.moe_implementation=eager \
        engine.attn_implementation=sdpa "engine.basic_modules=[$layer_cls]" > /dev/null
      check_layout "$OUT/ep2_veomni" "dp=2, expert parallel ep=2"
      "$PY" "$HERE/compare.py" -q "$REF" "$OUT/ep2_veomni" ;;
    worker_ep2)
      "$HERE/run_worker.sh" fsdp2 "$OUT/worker_fsdp2" > /dev/null
      "$HERE/run_worker.sh" verlcpp "$OUT/worker_ep1" > /dev/null
      "$HERE/run_worker.sh" verlcpp "$OUT/worker_ep2" --ep 2 > /dev/null
      check_layout "$OUT/worker_ep2" "dp=2, expert parallel ep=2" worker_log.txt
      "$PY" "$HERE/compare.py" -q "$OUT/worker_fsdp2" "$OUT/worker_ep2"
      # against the same engine at ep = 1, tighter: after an Adam step a parameter whose gradient is
      # near zero moves by up to lr either way, so fsdp2's own summation order alone gives ~8e-5 there
      "$PY" "$HERE/compare.py" -q --rtol 1e-5 "$OUT/worker_ep1" "$OUT/worker_ep2" ;;
    ep2dp2)
      ref
      SFT_NPROC=4 "$HERE/run_sft.sh" verlcpp "$OUT/ep2dp2" engine.expert_parallel_size=2 > /dev/null
      check_layout "$OUT/ep2dp2" "dp=4, expert parallel ep=2"
      "$PY" "$HERE/compare.py" -q "$REF" "$OUT/ep2dp2" ;;
    bad)
      mkdir -p "$OUT/bad"
      expect_failure "$OUT/bad/ep3" "expert_parallel_size=3 must be >= 1 and divide the world size (2 ranks)" \
        "$HERE/run_sft.sh" verlcpp "$OUT/bad/ep3" engine.expert_parallel_size=3
      expect_failure "$OUT/bad/dense" "has no experts" \
        VERL_FIXTURE="$DENSE" "$HERE/run_sft.sh" verlcpp "$OUT/bad/dense" engine.expert_parallel_size=2
      expect_failure "$OUT/bad/basic_modules" "FSDP wrap unit 'Qwen3MoeSparseMoeBlock' (basic_modules" \
        "$HERE/run_sft.sh" verlcpp_veomni "$OUT/bad/basic_modules" "engine.basic_modules=[Qwen3MoeSparseMoeBlock]"
      expect_failure "$OUT/bad/wrap_policy" "FSDP wrap unit 'Qwen3MoeAttention' (basic_modules / wrap_policy" \
        "$HERE/run_sft.sh" verlcpp "$OUT/bad/wrap_policy" "+engine.wrap_policy.transformer_layer_cls_to_wrap=[Qwen3MoeAttention]"
      expect_failure "$OUT/bad/init_device" "init_device='cuda'" \
        "$HERE/run_sft.sh" verlcpp_veomni "$OUT/bad/init_device" engine.init_device=cuda
      expect_failure "$OUT/bad/kernel" "rms_norm_implementation='triton'" \
        "$HERE/run_sft.sh" verlcpp_veomni "$OUT/bad/kernel" engine.rms_norm_implementation=triton ;;
    *) echo "run_ep.sh: unknown case $c" >&2; exit 2 ;;
  esac
  echo "run_ep.sh: $c ok ($(( $(date +%s) - t0 )) s)"
done
