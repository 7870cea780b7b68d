#!/usr/bin/env bash
# Wheels of the peer libraries the benchmarks and the diffusers tests compare against (diffusers,
# vector-quantize-pytorch and what they need, torch excluded) for a GPU machine that has torch but no network:
#
#   bash scripts/gpu_peers.sh                # here, with network or a local index: fills gpu-peers/ (~40 MB)
#   carry gpu-peers to the GPU machine, then bash scripts/gpu_validate.sh build installs them from it
#
# PEERS_PYTHON: the GPU machine's Python version (default 3.12); DIFFUSERS / VQ_PYTORCH: the versions compared
# against (default: those the CPU figures in the README were measured with).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
target=${PEERS_PYTHON:-3.12}
dest=gpu-peers
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# resolve with every dependency for the target Python (pip download has no "already installed"), then drop
# torch and what torch itself brings (the GPU machine's own torch stays)
$python -m pip download --quiet --dest "$work" --only-binary=:all: --python-version "$target" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  "diffusers==${DIFFUSERS:-0.42.1}" "vector-quantize-pytorch==${VQ_PYTORCH:-1.32.0}" numpy
rm -rf "$dest"
mkdir -p "$dest"
for wheel in "$work"/*.whl; do
  case "$(basename "$wheel")" in
    torch-* | triton-* | nvidia_* | cuda_* | sympy-* | mpmath-* | networkx-* | jinja2-* | markupsafe-* | \
      MarkupSafe-* | setuptools-*) ;;
    *) cp "$wheel" "$dest/" ;;
  esac
done
echo "$(ls "$dest" | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
