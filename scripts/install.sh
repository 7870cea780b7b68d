#!/usr/bin/env bash
# Create (or reuse) a virtual environment and build fastlatent into it.
#
#   bash scripts/install.sh           # .venv with torch, fastlatent built in place (pip -e)
#   bash scripts/install.sh --test    # also the test dependencies (pytest; diffusers and
#                                     # vector-quantize-pytorch, whose parity tests skip without them)
#   bash scripts/install.sh --bench   # also the benchmark peers (faiss-cpu, the two above)
#
# Environment:
#   FASTLATENT_VENV    where the venv lives (default .venv)
#   FASTLATENT_TORCH   the torch to install when the venv has none
#                      (default "torch==2.14.1 torchvision==0.29.1", a CUDA 13.0 build)
#   FASTLATENT_CUDA    0/1 to force the CUDA kernels off/on (default: on when nvcc is found)
#   MAX_JOBS           parallel compile jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${FASTLATENT_VENV:-.venv}
torch_spec=${FASTLATENT_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
extras=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(pytest pytest-benchmark expecttest diffusers vector-quantize-pytorch lpips scikit-image) ;;
    --bench) extras+=(pytest pytest-benchmark faiss-cpu diffusers vector-quantize-pytorch) ;;
    *) echo "install.sh: unknown option $arg (expected --test or --bench)" >&2; exit 2 ;;
  esac
done

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  echo "install.sh: installing $torch_spec into $venv"
  # shellcheck disable=SC2086
  pip install $torch_spec
fi
# fastlatent's own runtime dependencies (the editable install below is --no-deps).
pip install numpy pybind11 ninja "setuptools>=64" wheel safetensors tqdm pillow scikit-learn matplotlib ${extras[@]+"${extras[@]}"}
# No build isolation: compile against the torch in this venv, not a freshly downloaded one.
MAX_JOBS=${MAX_JOBS:-2} pip install --no-build-isolation --no-deps -e .
echo "install.sh: fastlatent built into $venv"
