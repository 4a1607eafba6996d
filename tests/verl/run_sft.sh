#!/usr/bin/env bash
# Runs verl's real SFT entry point (verl/trainer/sft_trainer.py, Hydra config sft_trainer_engine.yaml)
# on the CPU: torchrun, 2 ranks (SFT_NPROC), gloo, fp32, packed sequences (use_remove_padding), on the tiny fixture
# of tests/verl/make_fixture.py, 3 steps. The engine strategy is a parameter.
#
#   tests/verl/run_sft.sh STRATEGY OUTDIR [extra hydra overrides...]
#
# STRATEGY  fsdp2 (or fsdp) -> engine.strategy=STRATEGY on verl's engine/fsdp.yaml;
#           anything else   -> engine=STRATEGY, the Hydra option engine/STRATEGY.yaml (e.g. verlcpp),
#                              found on verl's config path or on SFT_HYDRA_SEARCHPATH (see below).
# Output    OUTDIR/metrics.jsonl  one JSON line per step, {"step": n, "data": {"train/loss", "train/grad_norm", ...}}
#                                 written by verl's own FileLogger (verl/utils/tracking.py, trainer.logger=file)
#           OUTDIR/log.txt        the run's stdout+stderr;   OUTDIR/ckpt/   verl's checkpoints (global_step_N)
# Variants  dynamic micro-batches:  extra overrides  data.use_dynamic_bsz=True data.max_token_len_per_gpu=512
#           save + resume:          SFT_RESUME_AT=2  runs steps 1..2 (saving global_step_2), then a second
#                                   torchrun resumes from it (trainer.resume_mode=auto) and runs to SFT_STEPS;
#                                   metrics.jsonl holds steps 1..SFT_STEPS from the two runs.
# Environment
#   VERLCPP_VENV          venv with torch + verl (default /opt/verlcpp/venv)
#   VERL_FIXTURE          fixture folder (default OUTDIR/fixture; made if missing)
#   SFT_STEPS             training steps (default 3)
#   SFT_TIMEOUT           seconds per torchrun (default 300)
#   SFT_NPROC             ranks (default 2; the global batch of 8 must divide over the data-parallel ranks)
#   SFT_HYDRA_SEARCHPATH  extra Hydra config search path, e.g. pkg://verlcpp.config or file:///abs/dir
#                         (added as hydra.searchpath=[...]) for an out-of-tree engine/STRATEGY.yaml
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 STRATEGY OUTDIR [extra hydra overrides...]" >&2
  exit 2
fi
STRATEGY=$1
OUT=$2
shift 2

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"
STEPS=${SFT_STEPS:-3}
TMO=${SFT_TIMEOUT:-300}
NPROC=${SFT_NPROC:-2}
export HYDRA_FULL_ERROR=1
export WANDB_MODE=disabled

case "$STRATEGY" in
  fsdp|fsdp2) ENGINE=(engine.strategy="$STRATEGY") ;;
  *)          ENGINE=(engine="$STRATEGY") ;;
esac
SEARCH=()
if [ -n "${SFT_HYDRA_SEARCHPATH:-}" ]; then
  SEARCH=("hydra.searchpath=[${SFT_HYDRA_SEARCHPATH}]")
fi

# one torchrun of verl's sft_trainer; $1 = metrics file, $2 = total steps, $3 = resume mode, rest = overrides
run_once() {
  local metrics=$1 steps=$2 resume=$3
  shift 3
  VERL_FILE_LOGGER_PATH=$metrics timeout --kill-after=10 "$TMO" \
    "$VENV/bin/torchrun" --standalone --nproc_per_node "$NPROC" -m verl.trainer.sft_trainer \
    data.train_files="$FIX/data/train.parquet" data.val_files=null \
    data.train_batch_size=8 data.micro_batch_size_per_gpu=2 data.use_dynamic_bsz=False \
    data.max_token_len_per_gpu=512 data.pad_mode=no_padding data.max_length=512 data.num_workers=0 \
    model.path="$FIX/model" model.use_remove_padding=True model.enable_gradient_checkpointing=False \
    +model.override_config.attn_implementation=sdpa \
    "${ENGINE[@]}" '++engine.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}' \
    engine.use_torch_compile=False \
    optim.lr=1e-3 optim.lr_warmup_steps=0 \
    trainer.total_epochs=1 trainer.total_training_steps="$steps" "trainer.logger=[console,file]" \
    trainer.device=cpu trainer.n_gpus_per_node="$NPROC" trainer.nnodes=1 \
    trainer.project_name=verl-cpu trainer.experiment_name="sft-$STRATEGY" \
    trainer.default_local_dir="$OUT/ckpt" trainer.resume_mode="$resume" \
    trainer.save_freq="${SAVE_FREQ:--1}" trainer.test_freq=-1 \
    hydra.run.dir="$OUT/hydra" "${SEARCH[@]}" "$@"
}

rm -rf "$OUT/ckpt" "$OUT"/metrics*.jsonl
start=$(date +%s.%N)
status=0
if [ -z "${SFT_RESUME_AT:-}" ]; then
  run_once "$OUT/metrics.jsonl" "$STEPS" disable "$@" > "$OUT/log.txt" 2>&1 || status=$?
else
  # first run stops (and saves, verl saves at the last step) at SFT_RESUME_AT; the second resumes from it
  run_once "$OUT/metrics_part1.jsonl" "$SFT_RESUME_AT" disable "$@" > "$OUT/log.txt" 2>&1 || status=$?
  if [ $status -eq 0 ]; then
    test -d "$OUT/ckpt/global_step_$SFT_RESUME_AT" || { echo "no checkpoint $OUT/ckpt/global_step_$SFT_RESUME_AT" >&2; exit 1; }
    run_once "$OUT/metrics_part2.jsonl" "$STEPS" auto "$@" > "$OUT/log_resume.txt" 2>&1 || status=$?
    cat "$OUT/metrics_part1.jsonl" "$OUT/metrics_part2.jsonl" > "$OUT/metrics.jsonl" 2>/dev/null || true
  fi
fi
end=$(date +%s.%N)
if [ $status -ne 0 ]; then
  log=$OUT/log.txt
  [ -f "$OUT/log_resume.txt" ] && log=$OUT/log_resume.txt
  echo "run_sft.sh: verl sft_trainer with strategy=$STRATEGY failed (exit $status); last lines of $log:" >&2
  grep -v '^\s*$' "$log" | grep -v '^\[rank[0-9]*\]:' | tail -12 >&2
  # the rank's own exception (torchrun's summary above only says which rank failed)
  grep -m1 -E '^(\[rank[0-9]+\]: )?[A-Za-z_.]*(Error|Exception): ' "$log" | grep -v ChildFailedError >&2 || true
  exit $status
fi
n=$(wc -l < "$OUT/metrics.jsonl")
if [ "$n" -ne "$STEPS" ]; then
  echo "run_sft.sh: expected $STEPS metric lines in $OUT/metrics.jsonl, found $n" >&2
  exit 1
fi
printf 'run_sft.sh: strategy=%s steps=%s %s in %.1f s -> %s/metrics.jsonl\n' "$STRATEGY" "$STEPS" \
  "${SFT_RESUME_AT:+(resumed at $SFT_RESUME_AT)}" "$(awk "BEGIN{print $end - $start}")" "$OUT"
