#!/usr/bin/env bash
# tests/compat/make_corpus_megatron.sh — Megatron-Core entries of the committed corpus
# (tests/compat/corpus/mcore-X.Y/<case>/), written by megatron-core's own
# dist_checkpointing.save (tests/oracle/make_megatron_ckpt.py --tiny) in a venv per release at
# $COMPAT_ROOT/mcore-X.Y. Not part of CI.
# Each entry keeps what the merger reads — ckpt/model/dist_ckpt/ and
# ckpt/model/huggingface/config.json — and ref.safetensors (save_pretrained of the HF model).
#
# Venvs: 0.19.2 is a full venv (Python 3.12: megatron-core >= 0.17 needs it; torch 2.11,
# transformers 5.10.4). Every other release gets a small venv that borrows torch and
# transformers from a base through a .pth file and installs only megatron-core (--no-deps):
# releases >= 0.17 borrow mcore-0.19's site-packages (Python 3.12), older ones the pinned venv's
# (/opt/verlcpp/venv, Python 3.11; override with COMPAT_BASE311). A few tens of MB each
# instead of ~5 GB of torch.
# Cases: CASES (default below) for every release, plus SINGLETON_CASES for releases >= 0.16
# (sharded_state_dict's singleton_local_shards, which writes linear_fc1 as weight_w / weight_v).
# Only the cases written are replaced in the corpus and the manifest.
# usage: [CASES=a,b] tests/compat/make_corpus_megatron.sh [0.13.1 0.18.2 0.19.2 ...]
set -euo pipefail
cd "$(dirname "$0")"
ROOT=${COMPAT_ROOT:-/opt/verlcpp/compat}
PY312=${COMPAT_PYTHON312:-$(command -v python3.12)}
PY311=${COMPAT_PYTHON311:-$(command -v python3.11)}
BASE311=${COMPAT_BASE311:-/opt/verlcpp/venv}
CASES=${CASES-qwen2_tp2,qwen2_pp2,qwen3_moe_ep2,qwen2_tp2_padvocab}
SINGLETON_CASES=${SINGLETON_CASES-qwen2_tp2_singleton,qwen3_moe_ep2_singleton}
RELEASES=("$@")
((${#RELEASES[@]})) || RELEASES=(0.13.1 0.18.2 0.19.2)
manifest=corpus/MANIFEST.tsv

has_release() { "$1/bin/python" -c "import psutil, megatron.core as m, sys; sys.exit(m.__version__ != '$2')" 2>/dev/null; }

make_venv() {  # release venv
  local rel=$1 venv=$2 minor=${1#0.}
  minor=${minor%%.*}
  if [[ $rel == 0.19.2 ]]; then
    [[ -x $venv/bin/python ]] || "$PY312" -m venv "$venv"
    "$venv/bin/pip" install -q "torch==2.11.0" "megatron-core==$rel" "transformers==5.10.4" "tokenizers==0.22.2" \
      "safetensors==0.8.0" numpy psutil
    return
  fi
  local py base pyver
  if ((minor >= 17)); then py=$PY312 base=$ROOT/mcore-0.19 pyver=3.12
    has_release "$base" 0.19.2 || make_venv 0.19.2 "$base"
  else py=$PY311 base=$BASE311 pyver=3.11
  fi
  [[ -x $venv/bin/python ]] || "$py" -m venv "$venv"
  echo "$base/lib/python$pyver/site-packages" > "$venv/lib/python$pyver/site-packages/zz_base_venv.pth"
  "$venv/bin/pip" install -q --no-deps "megatron-core==$rel"
}

for rel in "${RELEASES[@]}"; do
  short=${rel%.*}
  venv="$ROOT/mcore-$short"
  if ! has_release "$venv" "$rel"; then
    echo "make_corpus_megatron: installing megatron-core $rel into $venv"
    make_venv "$rel" "$venv"
  fi
  minor=${rel#0.}
  minor=${minor%%.*}
  cases=$CASES
  ((minor < 16)) || [[ -z $SINGLETON_CASES ]] || cases=${cases:+$cases,}$SINGLETON_CASES
  tmp=$(mktemp -d)
  cmd="$venv/bin/python tests/oracle/make_megatron_ckpt.py --tiny --out OUT --case"
  "$venv/bin/python" ../oracle/make_megatron_ckpt.py --tiny --out "$tmp" --case "$cases"
  out=corpus/mcore-$short
  for c in ${cases//,/ }; do
    rm -rf "${out:?}/$c"
    grep -v -P "^mcore-$rel\t$c\t" "$manifest" > "$manifest.new" || true
    mv "$manifest.new" "$manifest"
    mkdir -p "$out/$c/ckpt/model/huggingface"
    cp -r "$tmp/$c/ckpt/model/dist_ckpt" "$out/$c/ckpt/model/"
    cp "$tmp/$c/ckpt/model/huggingface/config.json" "$out/$c/ckpt/model/huggingface/"
    cp "$tmp/$c/ref/model.safetensors" "$out/$c/ref.safetensors"
    printf 'mcore-%s\t%s\twritten\t%s %s (dist_ckpt, config.json and ref/model.safetensors kept)\n' "$rel" "$c" "$cmd" "$c" >> "$manifest"
  done
  rm -rf "$tmp"
done
{ head -1 "$manifest"; tail -n +2 "$manifest" | sort -V; } > "$manifest.new" && mv "$manifest.new" "$manifest"
du -sb corpus
