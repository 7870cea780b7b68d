// CUDA sample_code (see sample_code.h for the math, the noise stream and the tie/NaN rules).
//
// SIMT, one warp per row: blockIdx.y is the search (head), blockIdx.x * kWarps + warp the row.
// Lane l visits codes l, l + 32, l + 64, ... in increasing order; per code it accumulates the dot
// product and the code's squared norm in fp32 (the row is read through the read-only cache, every
// lane the same address, a broadcast), forms the logit, and draws the Philox noise only when
// logit / T + kGumbelMax could beat the lane's running maximum. A butterfly of shuffles then
// merges the 32 lane maxima in the header's total order (NaN first, larger key, lower index), so
// the result does not depend on scheduling. No shared memory, no workspace, one launch.
// Not yet measured on a GPU; the row is re-read per code (L1 hits), and the codebook is read once
// per row: a tiled, tensor-core version of nearest_code's search with this epilogue is the next step
// if sampling shows up in a profile.
#include <cstdint>

#include "cuda_utils.cuh"
#include "sample_code.h"

namespace fastlatent {
namespace {

using cuda::to_float;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

struct LaneBest {
  float key;
  int32_t index;
  bool nan;
};

// The total order of the header: NaN keys first (lowest index), then larger key, then lower index.
__device__ __forceinline__ bool beats(const LaneBest& a, const LaneBest& b) {
  if (a.nan || b.nan) return a.nan && (!b.nan || a.index < b.index);
  return a.key > b.key || (a.key == b.key && a.index < b.index);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_code_kernel(const SampleCodeParams p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= p.n) return;  // warp-uniform
  const int64_t d = p.d, k = p.k;
  const T* __restrict__ x = static_cast<const T*>(p.x) + (b * p.n + row) * d;
  const T* __restrict__ codes = static_cast<const T*>(p.codebook) + b * k * d;

  float x_norm2 = 0.0f;
  bool row_finite = true;
  for (int64_t t = lane; t < d; t += 32) {
    const float v = to_float(__ldg(x + t));
    x_norm2 = fmaf(v, v, x_norm2);
    row_finite = row_finite && isfinite(v);
  }
  x_norm2 = cuda::warp_sum(x_norm2);
  row_finite = __all_sync(0xffffffffu, row_finite);

  const uint64_t row_element = static_cast<uint64_t>((b * p.n + row) * k);
  LaneBest best{-INFINITY, 0, false};
  for (int64_t code = lane; code < k; code += 32) {
    const T* __restrict__ c = codes + code * d;
    float dot = 0.0f, c_norm2 = 0.0f;
    bool code_finite = true;
    for (int64_t t = 0; t < d; ++t) {
      const float cv = to_float(__ldg(c + t));
      dot = fmaf(to_float(__ldg(x + t)), cv, dot);
      c_norm2 = fmaf(cv, cv, c_norm2);
      code_finite = code_finite && isfinite(cv);
    }
    float key;
    if (!code_finite) {
      key = NAN;
    } else if (p.metric == Metric::kL2) {
      key = fmaf(-2.0f, dot, c_norm2);
    } else {
      const float c_norm = sqrtf(c_norm2);
      key = -dot / (c_norm > kCosineEps ? c_norm : kCosineEps);
    }
    const float scaled = sample_code_logit(key, x_norm2, p.metric) * p.inv_temperature;
    if (best.nan) continue;
    if (isnan(scaled)) {
      best = LaneBest{best.key, static_cast<int32_t>(code), true};
      continue;
    }
    if (scaled + kGumbelMax <= best.key) continue;  // cannot win: skip the noise (exact)
    const float total = scaled + gumbel_noise(p.seed, p.offset, row_element + static_cast<uint64_t>(code));
    if (total > best.key) best = LaneBest{total, static_cast<int32_t>(code), false};
  }
#pragma unroll
  for (int shift = 16; shift > 0; shift >>= 1) {
    LaneBest other;
    other.key = __shfl_xor_sync(0xffffffffu, best.key, shift);
    other.index = __shfl_xor_sync(0xffffffffu, best.index, shift);
    other.nan = __shfl_xor_sync(0xffffffffu, static_cast<int>(best.nan), shift) != 0;
    if (beats(other, best)) best = other;
  }
  if (lane == 0) p.indices[b * p.n + row] = row_finite ? best.index : 0;  // non-finite row: every key NaN
}

}  // namespace

cudaError_t launch_sample_code_cuda(const SampleCodeParams& params, cudaStream_t stream) {
  if (params.k < 1 || params.d < 1 || params.n < 0 || params.batch < 0 || params.batch > 65535)
    return cudaErrorInvalidValue;
  if (params.k > INT32_MAX - 64 || !(params.inv_temperature > 0.0f)) return cudaErrorInvalidValue;
  if (params.n == 0 || params.batch == 0) return cudaSuccess;
  const int64_t blocks = (params.n + kWarps - 1) / kWarps;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(blocks), static_cast<unsigned int>(params.batch));
  return FL_CUDA_DTYPE_SWITCH(params.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    sample_code_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

}  // namespace fastlatent
