# common.sh — sourced by run_sft.sh, run_worker.sh and run_vlm.sh after they set HERE and OUT: the
# venv, the text fixture (made if missing; not with NO_TEXT_FIXTURE=1, for a script that makes its
# own) and the environment that runs verl on the CPU with the built verlcpp package. Sets ROOT,
# VENV, PY, OUT (absolute), FIX.
ROOT=$(cd "$HERE/../.." && pwd)
VENV=${VERLCPP_VENV:-/opt/verlcpp/venv}
PY=$VENV/bin/python
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
FIX=${VERL_FIXTURE:-$OUT/fixture}
if [ "${NO_TEXT_FIXTURE:-0}" != 1 ] && [ ! -f "$FIX/fixture.json" ]; then
  "$PY" "$HERE/make_fixture.py" "$FIX" > "$OUT/fixture.log" 2>&1 || { cat "$OUT/fixture.log" >&2; exit 1; }
fi
# verl on the CPU: the platform from python/verlcpp/cpu_platform.py, one thread per rank (2 cores)
export VERL_PLATFORM=cpu
export VERL_USE_EXTERNAL_MODULES=${VERL_USE_EXTERNAL_MODULES:-verlcpp}
# the built package (python/verlcpp + its extension): <build>/python
export PYTHONPATH=${VERLCPP_PYTHONPATH:-$ROOT/${BUILD_DIR:-build}/python}${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false
