#!/usr/bin/env bash
# tests/compat/make_corpus_megatron.sh — Megatron-Core entries of the committed corpus
# (tests/compat/corpus/mcore-X.Y/<case>/), written by megatron-core's own
# dist_checkpointing.save (tests/oracle/make_megatron_ckpt.py --tiny) in a venv per release at
# $COMPAT_ROOT/mcore-X.Y (megatron-core >= 0.17 needs Python 3.12). Not part of CI.
# Each entry keeps what the merger reads — ckpt/model/dist_ckpt/ and
# ckpt/model/huggingface/config.json — and ref.safetensors (save_pretrained of the HF model).
# usage: tests/compat/make_corpus_megatron.sh [0.19.2 ...]
set -euo pipefail
cd "$(dirname "$0")"
ROOT=${COMPAT_ROOT:-/opt/verlcpp/compat}
PY312=${COMPAT_PYTHON312:-$(command -v python3.12)}
CASES=qwen2_tp2,qwen2_pp2,qwen3_moe_ep2
RELEASES=("$@")
((${#RELEASES[@]})) || RELEASES=(0.19.2)
manifest=corpus/MANIFEST.tsv
for rel in "${RELEASES[@]}"; do
  short=${rel%.*}
  venv="$ROOT/mcore-$short"
  if ! "$venv/bin/python" -c "import psutil, megatron.core as m, sys; sys.exit(m.__version__ != '$rel')" 2>/dev/null; then
    echo "make_corpus_megatron: installing megatron-core $rel into $venv"
    [[ -x $venv/bin/python ]] || "$PY312" -m venv "$venv"
    "$venv/bin/pip" install -q "torch==2.11.0" "megatron-core==$rel" "transformers==5.10.4" "tokenizers==0.22.2" \
      "safetensors==0.8.0" numpy psutil
  fi
  tmp=$(mktemp -d)
  cmd="$venv/bin/python tests/oracle/make_megatron_ckpt.py --tiny --out OUT --case"
  "$venv/bin/python" ../oracle/make_megatron_ckpt.py --tiny --out "$tmp" --case "$CASES"
  out=corpus/mcore-$short
  rm -rf "$out"
  grep -v -P "^mcore-$rel\t" "$manifest" > "$manifest.new" || true
  mv "$manifest.new" "$manifest"
  for c in ${CASES//,/ }; do
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
