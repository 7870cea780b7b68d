// CUDA BSQ: quantize, its backward, the factorised entropy and its backward. See bsq.h.
//
// Quantize: a warp per group of rows, coalesced (sign_quantize.cuh). The backward kernels are one
// thread per row (grid stride); rows are short (d <= 62) and every row is read whole for its norm.
// The entropy's avg_probs: block b owns rows [b * kBsqChunkRows, (b + 1) * kBsqChunkRows), each thread
// accumulates its rows per dimension in fp64, the block reduces with a fixed shuffle tree into
// partial[b][:], and a second kernel sums the chunks in order: deterministic, and the same chunking as
// the CPU kernel.
#include <cmath>

#include "bsq.h"
#include "cuda_utils.cuh"
#include "sign_quantize.cuh"

namespace fastlatent {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float row_norm(const T* z, int d, bool* finite) {
  float ss = 0.0f;
  bool ok = true;
  for (int i = 0; i < d; ++i) {
    const float v = cuda::to_float(z[i]);
    ss = fmaf(v, v, ss);
    ok = ok && isfinite(v);
  }
  *finite = ok;
  return sqrtf(ss);
}

// grad_z = (g - u <u, g>) / ||z|| (g / eps below eps); g(i) is a functor giving dL/du_i.
template <typename T, typename GradFn>
__device__ __forceinline__ void project_backward(const T* z, int d, float norm, GradFn g, T* out) {
  if (!(norm >= static_cast<float>(kBsqEps))) {
    const float inv = isnan(norm) ? norm : static_cast<float>(1.0 / kBsqEps);
    for (int i = 0; i < d; ++i) out[i] = cuda::from_float<T>(g(i) * inv);
    return;
  }
  const float inv = 1.0f / norm;
  float ug = 0.0f;
  for (int i = 0; i < d; ++i) ug = fmaf(cuda::to_float(z[i]) * inv, g(i), ug);
  for (int i = 0; i < d; ++i) out[i] = cuda::from_float<T>((g(i) - cuda::to_float(z[i]) * inv * ug) * inv);
}

template <typename T>
__global__ void bsq_quantize_kernel(const T* __restrict__ z, T* __restrict__ q, int64_t* __restrict__ indices,
                                    int64_t n, int d, float mag) {
  cuda::sign_quantize_rows</*kRowNan=*/true>(z, q, indices, n, d, mag);
}

template <typename T>
__global__ void bsq_quantize_backward_kernel(const T* __restrict__ z, const T* __restrict__ g,
                                             T* __restrict__ out, int64_t n, int d) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n; r += stride) {
    bool finite;
    const float norm = row_norm(z + r * d, d, &finite);
    const T* gr = g + r * d;
    project_backward(z + r * d, d, norm, [&](int i) { return cuda::to_float(gr[i]); }, out + r * d);
  }
}

// Each thread owns kRowsPerThread rows of the chunk (r0 + threadIdx.x + k * kThreads) and keeps their
// inverse norms and entropies in registers; the dimension loop is outermost, so one fp64 sum per
// dimension is live at a time (no per-dimension array in local memory). Every sum keeps its order:
// acc for dimension i adds the thread's rows in increasing k from 0.0, and a row's entropy adds its
// dimensions in increasing i, exactly as a row-outer loop would; the block tree per dimension is the
// same. The row's elements for one dimension are re-read per dimension from L1/L2 (the norm pass
// brought them in).
constexpr int kRowsPerThread = static_cast<int>(kBsqChunkRows / kThreads);
static_assert(kRowsPerThread * kThreads == kBsqChunkRows, "a chunk is whole rows per thread");

template <typename T>
__global__ void __launch_bounds__(kThreads)
bsq_entropy_kernel(const T* __restrict__ z, float* __restrict__ entropy, double* __restrict__ partial,
                   int64_t n, int d, float scale) {
  __shared__ double warp_part[kThreads / 32];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBsqChunkRows + threadIdx.x;
  float inv[kRowsPerThread], h[kRowsPerThread];
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    const int64_t r = r0 + k * kThreads;
    inv[k] = 0.0f;
    h[k] = 0.0f;
    if (r < n) {
      bool finite;
      inv[k] = 1.0f / fmaxf(row_norm(z + r * d, d, &finite), static_cast<float>(kBsqEps));
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = 0; i < d; ++i) {
    double v = 0.0;
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const int64_t r = r0 + k * kThreads;
      if (r < n) {
        const cuda::Bernoulli b = cuda::bernoulli(scale * cuda::to_float(z[r * d + i]) * inv[k]);
        h[k] += b.entropy;
        v += static_cast<double>(b.qpos);
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_part[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
      double sum = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) sum += warp_part[w];
      partial[static_cast<int64_t>(blockIdx.x) * d + i] = sum;
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    const int64_t r = r0 + k * kThreads;
    if (r < n) entropy[r] = h[k];
  }
}

__global__ void bsq_avg_reduce_kernel(const double* __restrict__ partial, int64_t chunks, int d, int64_t n,
                                      float* __restrict__ avg) {
  const int i = threadIdx.x;
  if (i >= d) return;
  double sum = 0.0;
  for (int64_t c = 0; c < chunks; ++c) sum += partial[c * d + i];
  avg[i] = n == 0 ? __int_as_float(0x7fc00000) : static_cast<float>(sum / static_cast<double>(n));
}

template <typename T>
__global__ void bsq_entropy_backward_kernel(const T* __restrict__ z, const float* __restrict__ gps,
                                            const float* __restrict__ gavg, T* __restrict__ out, int64_t n,
                                            int d, float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const float inv_n = 1.0f / static_cast<float>(n);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n; r += stride) {
    const T* row = z + r * d;
    bool finite;
    const float norm = row_norm(row, d, &finite);
    const float inv = 1.0f / fmaxf(norm, static_cast<float>(kBsqEps));
    const float gr = gps[r];
    auto grad_u = [&](int i) {
      const cuda::Bernoulli b = cuda::bernoulli(scale * cuda::to_float(row[i]) * inv);
      return scale * (gr * b.dentropy + gavg[i] * inv_n * b.var);
    };
    project_backward(row, d, norm, grad_u, out + r * d);
  }
}

unsigned int row_blocks(int64_t n) { return cuda::grid_blocks(cuda::ceil_div(n, kThreads)); }

}  // namespace

cudaError_t launch_bsq_quantize_cuda(const BsqParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  if (p.d < 1 || p.d > kBsqMaxDims) return cudaErrorInvalidValue;
  const float mag = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.d)));
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    bsq_quantize_kernel<scalar_t><<<cuda::sign_quantize_blocks(p.n, p.d, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(p.z), static_cast<scalar_t*>(p.quantized), p.indices, p.n, p.d, mag);
    return cudaGetLastError();
  });
}

cudaError_t launch_bsq_quantize_backward_cuda(const BsqParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  if (p.d < 1 || p.d > kBsqMaxDims) return cudaErrorInvalidValue;
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    bsq_quantize_backward_kernel<scalar_t><<<row_blocks(p.n), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(p.z), static_cast<const scalar_t*>(p.grad_quantized),
        static_cast<scalar_t*>(p.grad_z), p.n, p.d);
    return cudaGetLastError();
  });
}

cudaError_t launch_bsq_entropy_cuda(const BsqParams& p, cudaStream_t stream) {
  if (p.d < 1 || p.d > kBsqMaxDims || (p.n > 0 && p.workspace == nullptr)) return cudaErrorInvalidValue;
  const int64_t chunks = (p.n + kBsqChunkRows - 1) / kBsqChunkRows;
  double* partial = static_cast<double*>(p.workspace);
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    if (chunks > 0) {
      bsq_entropy_kernel<scalar_t><<<static_cast<unsigned int>(chunks), kThreads, 0, stream>>>(
          static_cast<const scalar_t*>(p.z), static_cast<float*>(p.per_sample_entropy), partial, p.n, p.d,
          static_cast<float>(p.logit_scale));
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    bsq_avg_reduce_kernel<<<1, 64, 0, stream>>>(partial, chunks, p.d, p.n, static_cast<float*>(p.avg_probs));
    return cudaGetLastError();
  });
}

cudaError_t launch_bsq_entropy_backward_cuda(const BsqParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  if (p.d < 1 || p.d > kBsqMaxDims) return cudaErrorInvalidValue;
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    bsq_entropy_backward_kernel<scalar_t><<<row_blocks(p.n), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(p.z), static_cast<const float*>(p.grad_per_sample),
        static_cast<const float*>(p.grad_avg_probs), static_cast<scalar_t*>(p.grad_z), p.n, p.d,
        static_cast<float>(p.logit_scale));
    return cudaGetLastError();
  });
}

}  // namespace fastlatent
