#!/usr/bin/env bash
# GPU validation on an H100/H200 in a few long commands (each step fits in 10 minutes; the whole run in about 30).
#
#   bash scripts/gpu_validate.sh build      # editable build against the machine's torch, for its GPU's arch
#   bash scripts/gpu_validate.sh test       # the cuda-marked tests, then the whole suite
#   bash scripts/gpu_validate.sh sanitize   # compute-sanitizer memcheck + racecheck over every op's test samples
#   bash scripts/gpu_validate.sh bench      # fastlatent bench --device cuda (--quick; BENCH=--full for all)
#   bash scripts/gpu_validate.sh profile    # Nsight Compute on the GroupNorm and fused GroupNorm-conv kernels
#   bash scripts/gpu_validate.sh all        # all five in order
#
# Logs and results go to $OUT (the device tool's folder) or ./gpu-results; the benchmark's files are packed into
# one bench-cuda.tgz so they come back as a single file. Missing peers (diffusers, vector-quantize-pytorch,
# lpips) are skipped by the tests and benchmarks: `bash scripts/gpu_peers.sh` puts the wheels of the first two
# in gpu-peers/, and the build step installs them from there when that folder is carried to the machine (the
# diffusers scheduler tests, CUDA-graph capture of patched loops included, and the patched-scheduler rows).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

step_build() {
  local arch
  arch=$($python -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')") || return 1
  echo "building for sm $arch"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} FASTLATENT_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    $python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -5 | tee "$out/build.log"
  if compgen -G "gpu-peers/*.whl" > /dev/null; then  # offline: the peers' wheels, the machine's own torch
    $python -m pip install --no-index --find-links gpu-peers diffusers vector-quantize-pytorch 2>&1 \
      | tail -1 | tee -a "$out/build.log"
  fi
  $python -m fastlatent info | tee -a "$out/build.log"
  $python -m fastlatent selftest 2>&1 | tee "$out/selftest.log"
}

step_test() {
  $python -m pytest -q -m cuda -x 2>&1 | tee "$out/tests-cuda.log" | tail -3
  $python -m pytest -q 2>&1 | tee "$out/tests-all.log" | tail -3
}

step_sanitize() {
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  "$sanitizer" --tool memcheck --error-exitcode 1 $python scripts/gpu_sanitize.py 2>&1 \
    | tee "$out/memcheck.log" | tail -3
  "$sanitizer" --tool racecheck --error-exitcode 1 $python scripts/gpu_sanitize.py --max-samples 2 2>&1 \
    | tee "$out/racecheck.log" | tail -3
}

step_bench() {
  local dir
  dir=$(mktemp -d)
  $python -m fastlatent bench --device cuda ${BENCH:---quick} --out "$dir/results" 2>&1 | tee "$out/bench.log" | tail -3
  tar czf "$out/bench-cuda.tgz" -C "$dir" results
  step_predicted "$dir/results/results.json"
}

# Measured vs predicted per modelled workload (docs/performance-model.md): the first GPU run scores the model.
# The bench step runs it; alone: RESULTS=<bench dir>/results.json bash scripts/gpu_validate.sh predicted
step_predicted() {
  local results=${1:-${RESULTS:-}}
  [ -f "$results" ] || { echo "no bench results.json to compare with the model (${results:-unset})"; return 0; }
  $python scripts/perf_model.py --compare "$results" 2>&1 | tee "$out/predicted-vs-measured.log"
}

# Nsight Compute summaries (throughput, occupancy, limiter) of the kernels with bandwidth or tensor-core targets,
# at the SD-VAE decoder's 1024 px shapes: what the GPU validation asks for where a target is missed.
step_profile() {
  local ncu
  ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  [ -x "$ncu" ] || { echo "ncu not found: skipping the profile" | tee "$out/profile.log"; return 0; }
  "$ncu" --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    -c 40 $python - <<'PY' 2>&1 | tee "$out/profile.log" | tail -40
import torch, fastlatent
from fastlatent import ops
x = torch.randn(1, 512, 128, 128, device="cuda", dtype=torch.bfloat16)
gw, gb = torch.ones(512, device="cuda"), torch.zeros(512, device="cuda")
w = torch.randn(512, 512, 3, 3, device="cuda", dtype=torch.bfloat16) / 48
with torch.inference_mode():
    ops.group_norm(x, gw, gb, 32, 1e-6, "silu")
    ops.group_norm_conv3x3(x, gw, gb, 32, w, None, eps=1e-6, algorithm="fused")
    big = torch.randn(1, 128, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    ops.group_norm(big, gw[:128], gb[:128], 32, 1e-6, "silu")
    ops.group_norm_conv3x3(big, gw[:128], gb[:128], 32, w[:128, :128].contiguous(), None, eps=1e-6,
                           algorithm="fused")
torch.cuda.synchronize()
PY
}

case "${1:-all}" in
  build) step_build ;;
  test) step_test ;;
  sanitize) step_sanitize ;;
  bench) step_bench ;;
  profile) step_profile ;;
  predicted) step_predicted ;;
  all) step_build && step_test; step_sanitize; step_bench; step_profile ;;
  *) echo "gpu_validate.sh: expected build, test, sanitize, bench, profile, predicted or all, got $1" >&2; exit 2 ;;
esac
