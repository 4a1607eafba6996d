#!/usr/bin/env bash
# tests/compat/make_corpus.sh — regenerate the committed corpus of checkpoints written by other
# torch releases (tests/compat/corpus/torch-X.Y/<case>/). Not part of CI: the corpus is
# committed, and test_compat_corpus merges every entry bit for bit against its reference.
#   1. make_venvs.sh: one venv per release under $COMPAT_ROOT (default /opt/verlcpp/compat), reused
#   2. write_ckpt.py in each venv: the cases listed in write_ckpt.py (FSDP2 w2/w3, HSDP 2x2,
#      FSDP1 with and without a mesh, LoRA), with unsharded references
#   3. corpus/MANIFEST.tsv: release, case, the exact command, what was skipped and why
# usage: tests/compat/make_corpus.sh [2.4.1 2.6.0 ...]     (default: the releases below)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=${COMPAT_ROOT:-/opt/verlcpp/compat}
RELEASES=("$@")
((${#RELEASES[@]})) || RELEASES=(2.4.1 2.6.0 2.9.1 2.12.1 2.13.0 2.15.0)
bash make_venvs.sh "${RELEASES[@]}"
mkdir -p corpus
manifest=corpus/MANIFEST.tsv
[[ -f $manifest ]] || printf 'torch\tcase\tstatus\tcommand\n' > "$manifest"
for rel in "${RELEASES[@]}"; do
  short=${rel%.*}
  out=corpus/torch-$short
  rm -rf "$out"
  mkdir -p "$out"
  cmd="$ROOT/torch-$short/bin/python tests/compat/write_ckpt.py --out tests/compat/$out"
  echo "make_corpus: $cmd"
  log=$("$ROOT/torch-$short/bin/python" write_ckpt.py --out "$out" 2>&1 | grep '^write_ckpt:' || true)
  echo "$log"
  grep -v -P "^$rel\t" "$manifest" > "$manifest.new" || true
  mv "$manifest.new" "$manifest"
  while IFS= read -r line; do
    case_name=$(sed -E 's/^write_ckpt: torch [^:]+: ([a-z0-9_]+).*/\1/' <<<"$line")
    status=written
    [[ $line == *SKIPPED* ]] && status="skipped: ${line#*SKIPPED, }"
    printf '%s\t%s\t%s\t%s --case %s\n' "$rel" "$case_name" "$status" "$cmd" "$case_name" >> "$manifest"
  done <<<"$log"
done
{ head -1 "$manifest"; tail -n +2 "$manifest" | sort -V; } > "$manifest.new" && mv "$manifest.new" "$manifest"
du -sb corpus
