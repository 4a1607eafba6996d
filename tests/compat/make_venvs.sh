#!/usr/bin/env bash
# tests/compat/make_venvs.sh — one Python venv per torch release, at a fixed path outside the
# repo (default /opt/verlcpp/compat/torch-X.Y), reused when it already imports. Used by
# make_corpus.sh; not part of CI. Each venv is the plain PyPI wheel with its dependencies
# (3–5 GB: the CUDA libraries must be present for `import torch`, even on a CPU-only machine).
#   COMPAT_ROOT   where the venvs live (default /opt/verlcpp/compat)
#   COMPAT_PYTHON interpreter to create them with (default: python3.11)
#   usage: make_venvs.sh [2.4.1 2.6.0 ...]
set -euo pipefail
ROOT=${COMPAT_ROOT:-/opt/verlcpp/compat}
PY=${COMPAT_PYTHON:-$(command -v python3.11)}
RELEASES=("$@")
((${#RELEASES[@]})) || RELEASES=(2.4.1 2.6.0 2.9.1 2.12.1 2.13.0 2.15.0)
mkdir -p "$ROOT"
for rel in "${RELEASES[@]}"; do
  short=${rel%.*}
  venv="$ROOT/torch-$short"
  if [[ -x $venv/bin/python ]] && "$venv/bin/python" -c "import torch,sys; sys.exit(torch.__version__.split('+')[0] != '$rel')" 2>/dev/null; then
    echo "make_venvs: $venv has torch $rel"
    continue
  fi
  echo "make_venvs: installing torch $rel into $venv"
  [[ -x $venv/bin/python ]] || "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==$rel" numpy
  "$venv/bin/python" -c "import torch, torch.distributed as d; assert d.is_gloo_available(); print('make_venvs: torch', torch.__version__, 'ok')"
done
