# expect_failure.sh — sourced by run_sp.sh and run_ep.sh: expect_failure DIR WANT [ENV...] CMD...
# runs a case that must be refused (env + run_sft.sh args) and checks that its error line (the
# rank's exception, the last "...Error: " / "...Exception: " line on stderr) contains WANT.
expect_failure() {
  local dir=$1 want=$2 me=${0##*/}
  shift 2
  local status=0
  env "$@" > "$dir.stdout" 2> "$dir.stderr" || status=$?
  if [ $status -eq 0 ]; then
    echo "$me: expected the run in $dir to fail ($want)" >&2
    exit 1
  fi
  local line
  line=$(grep -E '(Error|Exception): ' "$dir.stderr" | tail -1 || true)
  if [[ "$line" != *"$want"* ]]; then
    echo "$me: the failing run in $dir did not say '$want'; its error line: ${line:-<none>}" >&2
    tail -5 "$dir.stderr" >&2
    exit 1
  fi
  echo "$me: refused as expected: ${line#*: }"
}
