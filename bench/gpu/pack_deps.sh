#!/usr/bin/env bash
# bench/gpu/pack_deps.sh — run HERE (this machine reaches Debian's mirrors; the GPU machine reaches
# nothing): downloads the .deb files of the few build dependencies the GPU machine lacks into
# .gpu-deps/ (git-ignored, ~1 MB) for bench/gpu/check.sh, which unpacks them into a private prefix.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu-deps
cd .gpu-deps
pkgs=(nlohmann-json3-dev libcli11-dev libyaml-cpp-dev libyaml-cpp0.7)
have=$(ls 2>/dev/null | wc -l)
if (( have < ${#pkgs[@]} )); then apt-get download "${pkgs[@]}"; fi
ls -la
