// CUDA nearest_code. See nearest_code.h for the math and the tie/NaN rules.
//
// Two kernels:
//   1. code_keys: one warp per code computes alpha[k], beta[k] (fp32) into the workspace.
//   2. nearest_code_tiled: a block owns kBM rows of x and streams the whole codebook in
//      tiles of kBN codes. x and code tiles of kBD dims are staged in shared memory
//      (converted to fp32, transposed so the compute loop reads them conflict-free); each
//      of the 16x16 threads accumulates a 4x4 register tile of dot products in fp32.
//      After a code tile the thread folds its keys into a per-row running minimum; at the
//      end the 16 threads sharing a row reduce (key, index) pairs with shuffles, and one
//      warp per row recomputes the exact distance of the winner.
// The (key, index) order is total (NaN first, then by key, then by index), so the result
// is the same for any reduction order: deterministic run to run.
//
// This is the portable SIMT path (any sm_75+). Tensor-core tiles for fp16/bf16 are
// planned for the VQ issue, behind the same entry point.
#include <cmath>

#include "cuda_utils.cuh"
#include "nearest_code.h"

namespace fastlatent {
namespace {

constexpr int kBM = 64;        // rows of x per block
constexpr int kBN = 64;        // codes per tile
constexpr int kBD = 16;        // dims per shared-memory stage
constexpr int kThreads = 256;  // 16 x 16
constexpr int kPad = 4;

template <typename T>
__global__ void code_keys_kernel(const T* __restrict__ codebook, int64_t k, int64_t d,
                                 Metric metric, float* __restrict__ alpha,
                                 float* __restrict__ beta) {
  const int lane = threadIdx.x & 31;
  const int64_t code = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (code >= k) return;
  const T* row = codebook + code * d;
  float norm2 = 0.0f;
  bool finite = true;
  for (int64_t t = lane; t < d; t += 32) {
    const float v = cuda::to_float(row[t]);
    norm2 += v * v;
    finite = finite && isfinite(v);
  }
  norm2 = cuda::warp_sum(norm2);
  finite = __all_sync(0xffffffffu, finite);
  if (lane == 0) {
    float a, b;
    if (metric == Metric::kL2) {
      a = -2.0f;
      b = norm2;
    } else {
      a = -1.0f / fmaxf(sqrtf(norm2), kCosineEps);
      b = 0.0f;
    }
    alpha[code] = a;
    beta[code] = finite ? b : __int_as_float(0x7fc00000);  // NaN key: this code wins
  }
}

// (key, index) total order: NaN keys first, then smaller key, then smaller index.
__device__ __forceinline__ bool better(float key, int64_t index, float best_key, int64_t best_index) {
  const bool key_nan = isnan(key), best_nan = isnan(best_key);
  if (key_nan || best_nan) return key_nan && (!best_nan || index < best_index);
  return key < best_key || (key == best_key && index < best_index);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
nearest_code_tiled_kernel(const T* __restrict__ x, const T* __restrict__ codebook,
                          const float* __restrict__ alpha, const float* __restrict__ beta,
                          int64_t n, int64_t k, int64_t d, Metric metric,
                          int64_t* __restrict__ indices, float* __restrict__ distances) {
  __shared__ float xs[kBD][kBM + kPad];
  __shared__ float cs[kBD][kBN + kPad];
  __shared__ int64_t winner[kBM];

  const int tid = threadIdx.x;
  const int tx = tid & 15;  // code lane
  const int ty = tid >> 4;  // row lane
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;

  float best_key[4];
  int64_t best_index[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best_key[i] = INFINITY;
    best_index[i] = 0;
  }

  for (int64_t code0 = 0; code0 < k; code0 += kBN) {
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (int64_t d0 = 0; d0 < d; d0 += kBD) {
      // Stage kBM x kBD of x and kBN x kBD of codes; 4 elements of each per thread,
      // consecutive threads on consecutive dims (coalesced). Out-of-range reads are 0,
      // which leaves dot products unchanged.
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int local = tid + s * kThreads;
        const int r = local / kBD, t = local % kBD;
        const int64_t row = row0 + r, code = code0 + r, dim = d0 + t;
        xs[t][r] = (row < n && dim < d) ? cuda::to_float(x[row * d + dim]) : 0.0f;
        cs[t][r] = (code < k && dim < d) ? cuda::to_float(codebook[code * d + dim]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kBD; ++t) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = xs[t][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = cs[t][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }

#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t code = code0 + tx + 16 * j;
      if (code >= k) continue;
      const float a = alpha[code], b = beta[code];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float key = fmaf(a, acc[i][j], b);
        if (better(key, code, best_key[i], best_index[i])) {
          best_key[i] = key;
          best_index[i] = code;
        }
      }
    }
  }

  // Reduce over the 16 code lanes of each row (lanes tx = 0..15 of a half-warp).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int offset = 8; offset > 0; offset >>= 1) {
      const float other_key = __shfl_xor_sync(0xffffffffu, best_key[i], offset);
      const int64_t other_index = __shfl_xor_sync(0xffffffffu, best_index[i], offset);
      if (better(other_key, other_index, best_key[i], best_index[i])) {
        best_key[i] = other_key;
        best_index[i] = other_index;
      }
    }
    if (tx == 0) winner[ty + 16 * i] = best_index[i];
  }
  __syncthreads();

  // Exact distance of the winner, one warp per row.
  const int warp = tid >> 5, lane = tid & 31;
  for (int r = warp; r < kBM; r += kThreads / 32) {
    const int64_t row = row0 + r;
    if (row >= n) break;
    const T* x_row = x + row * d;
    bool finite = true;
    for (int64_t t = lane; t < d; t += 32) finite = finite && isfinite(cuda::to_float(x_row[t]));
    finite = __all_sync(0xffffffffu, finite);
    const int64_t index = finite ? winner[r] : 0;  // every key of the row is NaN
    const T* c_row = codebook + index * d;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f;
    for (int64_t t = lane; t < d; t += 32) {
      const float xv = cuda::to_float(x_row[t]), cv = cuda::to_float(c_row[t]);
      if (metric == Metric::kL2) {
        s0 += (xv - cv) * (xv - cv);
      } else {
        s0 += xv * cv;
        s1 += xv * xv;
        s2 += cv * cv;
      }
    }
    s0 = cuda::warp_sum(s0);
    s1 = cuda::warp_sum(s1);
    s2 = cuda::warp_sum(s2);
    if (lane == 0) {
      indices[row] = index;
      distances[row] = metric == Metric::kL2
                           ? s0
                           : 1.0f - s0 / (fmaxf(sqrtf(s1), kCosineEps) * fmaxf(sqrtf(s2), kCosineEps));
    }
  }
}

template <typename T>
cudaError_t launch_typed(const NearestCodeParams& p, cudaStream_t stream) {
  float* alpha = static_cast<float*>(p.workspace);
  float* beta = alpha + p.k;
  const T* x = static_cast<const T*>(p.x);
  const T* codebook = static_cast<const T*>(p.codebook);

  constexpr int kKeyThreads = 256;  // 8 codes per block
  code_keys_kernel<T><<<cuda::ceil_div(p.k * 32, kKeyThreads), kKeyThreads, 0, stream>>>(
      codebook, p.k, p.d, p.metric, alpha, beta);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  nearest_code_tiled_kernel<T><<<cuda::ceil_div(p.n, kBM), kThreads, 0, stream>>>(
      x, codebook, alpha, beta, p.n, p.k, p.d, p.metric, p.indices, p.distances);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_nearest_code_cuda(const NearestCodeParams& params, cudaStream_t stream) {
  if (params.n == 0) return cudaSuccess;
  if (params.k < 1 || params.d < 1 || params.workspace == nullptr) return cudaErrorInvalidValue;
  return FL_CUDA_DTYPE_SWITCH(params.dtype, scalar_t, cudaErrorInvalidValue,
                              [&] { return launch_typed<scalar_t>(params, stream); });
}

}  // namespace fastlatent
