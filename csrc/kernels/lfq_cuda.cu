// CUDA LFQ: quantize, entropy and its backward. See lfq.h for the math and the NaN rules.
//
// quantize: one thread per row (grid stride), d <= 62 elements, int64 index from the bits.
// entropy forward, three kernels:
//   1. per-sample entropies, one thread per row;
//   2. avg_probs partial sums: grid (tiles of tile_u rows of the 2^U x 2^L matrix) x (fixed
//      sample splits). A block walks its split in batches of kBatch samples: it computes the
//      Bernoulli probabilities of the batch, expands wL (all 2^L columns) and wU (its tile_u
//      rows) into shared memory, and each thread adds sum_b wU[b][u] wL[b][l] for its (u, l)
//      entries (at most kMaxPerThread) into fp64 registers, fp32 within a batch;
//   3. one thread per avg_probs entry sums the splits in order and divides by N.
//   No atomics: deterministic. Workspace: splits x 2^d doubles (capped at 16 MiB).
// entropy backward: one kernel over blocks of kB samples (grid stride), all in shared memory:
//   Bernoullis -> wU, wL -> hU = wL G^T and hL = wU G (threads over (sample, entry), reading rows
//   of G^T / G coalesced; G^T is prepared in the workspace by a transpose kernel) -> leave-one-out
//   sums, one thread per (sample, dim) -> dL/dx.
#include <cmath>

#include "cuda_utils.cuh"
#include "lfq.h"

namespace fastlatent {
namespace {

constexpr int kThreads = 256;
constexpr int kBatch = 16;          // samples per batch in the avg_probs kernel
constexpr int kMaxPerThread = 4;    // (u, l) entries per thread in the avg_probs kernel
constexpr int kMaxL = 1 << (kLfqMaxEntropyDims / 2);
constexpr int kMaxTileU = 64;
constexpr size_t kMaxPartialBytes = size_t{16} << 20;

struct Layout {
  int u_bits, l_bits, nu, nl, tile_u, tiles;
  explicit Layout(int d)
      : u_bits(d - d / 2), l_bits(d / 2), nu(1 << (d - d / 2)), nl(1 << (d / 2)) {
    tile_u = kThreads * kMaxPerThread / nl;
    tile_u = tile_u < 1 ? 1 : (tile_u > kMaxTileU ? kMaxTileU : tile_u);
    tile_u = tile_u > nu ? nu : tile_u;
    tiles = (nu + tile_u - 1) / tile_u;
  }
};

int num_splits(int64_t n, int d) {
  if (n == 0) return 1;
  const Layout lay(d);
  const int64_t target = static_cast<int64_t>(cuda::grid_blocks(int64_t{1} << 30, 4));  // 4 x SMs
  int64_t splits = (target + lay.tiles - 1) / lay.tiles;
  const int64_t max_by_samples = (n + 255) / 256;  // at least 256 samples per split
  const int64_t max_by_memory = static_cast<int64_t>(kMaxPartialBytes / ((size_t{1} << d) * sizeof(double)));
  splits = splits > max_by_samples ? max_by_samples : splits;
  splits = splits > max_by_memory ? max_by_memory : splits;
  return static_cast<int>(splits < 1 ? 1 : splits);
}

__device__ __forceinline__ float expand_entry(const float* qp, const float* qn, int m, int idx) {
  float w = 1.0f;
  for (int j = 0; j < m; ++j) w *= ((idx >> (m - 1 - j)) & 1) ? qp[j] : qn[j];
  return w;
}

template <typename T>
__global__ void lfq_quantize_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t* __restrict__ indices,
                                    int64_t n, int d, float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const T pos = cuda::from_float<T>(scale), neg = cuda::from_float<T>(-scale);
  const T nan = cuda::from_float<T>(__int_as_float(0x7fc00000));
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n; r += stride) {
    long long index = 0;
    bool has_nan = false;
    for (int i = 0; i < d; ++i) {
      const float v = cuda::to_float(x[r * d + i]);
      const bool bit = v > 0.0f;
      has_nan |= isnan(v);
      out[r * d + i] = isnan(v) ? nan : (bit ? pos : neg);
      index = (index << 1) | static_cast<long long>(bit);
    }
    indices[r] = has_nan ? -1 : index;
  }
}

template <typename T>
__global__ void lfq_sample_entropy_kernel(const T* __restrict__ x, float* __restrict__ entropy, int64_t n, int d,
                                          float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n; r += stride) {
    float h = 0.0f;
    for (int i = 0; i < d; ++i) h += cuda::bernoulli(scale * cuda::to_float(x[r * d + i])).entropy;
    entropy[r] = h;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
lfq_probs_partial_kernel(const T* __restrict__ x, int64_t n, int d, float scale, Layout lay,
                         int64_t samples_per_split, double* __restrict__ partial) {
  __shared__ float qp[kBatch][kLfqMaxEntropyDims], qn[kBatch][kLfqMaxEntropyDims];
  __shared__ float wl[kBatch][kMaxL];
  __shared__ float wu[kBatch][kMaxTileU];
  const int tid = threadIdx.x;
  const int u0 = blockIdx.x * lay.tile_u;
  const int tile_u = lay.nu - u0 < lay.tile_u ? lay.nu - u0 : lay.tile_u;
  const int entries = tile_u * lay.nl;
  const int64_t s_begin = static_cast<int64_t>(blockIdx.y) * samples_per_split;
  const int64_t s_end = n < s_begin + samples_per_split ? n : s_begin + samples_per_split;

  double acc[kMaxPerThread];
#pragma unroll
  for (int k = 0; k < kMaxPerThread; ++k) acc[k] = 0.0;

  for (int64_t s0 = s_begin; s0 < s_end; s0 += kBatch) {
    const int nb = static_cast<int>(s_end - s0 < kBatch ? s_end - s0 : kBatch);
    for (int e = tid; e < nb * d; e += kThreads) {
      const int b = e / d, i = e % d;
      const cuda::Bernoulli be = cuda::bernoulli(scale * cuda::to_float(x[(s0 + b) * d + i]));
      qp[b][i] = be.qpos;
      qn[b][i] = be.qneg;
    }
    __syncthreads();
    for (int e = tid; e < nb * lay.nl; e += kThreads) {
      const int b = e / lay.nl, l = e % lay.nl;
      wl[b][l] = expand_entry(&qp[b][lay.u_bits], &qn[b][lay.u_bits], lay.l_bits, l);
    }
    for (int e = tid; e < nb * tile_u; e += kThreads) {
      const int b = e / tile_u, ul = e % tile_u;
      wu[b][ul] = expand_entry(qp[b], qn[b], lay.u_bits, u0 + ul);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kMaxPerThread; ++k) {
      const int e = tid + k * kThreads;
      if (e < entries) {
        const int ul = e / lay.nl, l = e % lay.nl;
        float t = 0.0f;
        for (int b = 0; b < nb; ++b) t = fmaf(wu[b][ul], wl[b][l], t);
        acc[k] += static_cast<double>(t);
      }
    }
    __syncthreads();
  }
  double* out = partial + static_cast<int64_t>(blockIdx.y) * (static_cast<int64_t>(lay.nu) * lay.nl);
#pragma unroll
  for (int k = 0; k < kMaxPerThread; ++k) {
    const int e = tid + k * kThreads;
    if (e < entries) out[static_cast<int64_t>(u0) * lay.nl + e] = acc[k];
  }
}

__global__ void lfq_probs_reduce_kernel(const double* __restrict__ partial, int splits, int64_t codes, int64_t n,
                                        float* __restrict__ avg) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= codes) return;
  double sum = 0.0;
  for (int s = 0; s < splits; ++s) sum += partial[s * codes + c];
  avg[c] = n == 0 ? __int_as_float(0x7fc00000) : static_cast<float>(sum / static_cast<double>(n));
}

__global__ void transpose_kernel(const float* __restrict__ g, float* __restrict__ gt, int nu, int nl) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= static_cast<int64_t>(nu) * nl) return;
  const int u = static_cast<int>(e / nl), l = static_cast<int>(e % nl);
  gt[static_cast<int64_t>(l) * nu + u] = g[e];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
lfq_entropy_backward_kernel(const T* __restrict__ x, int64_t n, int d, float scale, Layout lay, int kb,
                            const float* __restrict__ G, const float* __restrict__ GT,
                            const float* __restrict__ gps, T* __restrict__ grad_x) {
  extern __shared__ float smem[];
  float* qp = smem;               // [kb][d]
  float* qn = qp + kb * d;        // [kb][d]
  float* var = qn + kb * d;       // [kb][d]
  float* dh = var + kb * d;       // [kb][d]
  float* wu = dh + kb * d;        // [kb][nu]
  float* wl = wu + kb * lay.nu;   // [kb][nl]
  float* hu = wl + kb * lay.nl;   // [kb][nu]
  float* hl = hu + kb * lay.nu;   // [kb][nl]
  const int tid = threadIdx.x;
  const float inv_n = 1.0f / static_cast<float>(n);
  const int64_t num_blocks = (n + kb - 1) / kb;
  for (int64_t blk = blockIdx.x; blk < num_blocks; blk += gridDim.x) {
    const int64_t s0 = blk * kb;
    const int nb = static_cast<int>(n - s0 < kb ? n - s0 : kb);
    for (int e = tid; e < nb * d; e += kThreads) {
      const cuda::Bernoulli be = cuda::bernoulli(scale * cuda::to_float(x[s0 * d + e]));
      qp[e] = be.qpos;
      qn[e] = be.qneg;
      var[e] = be.var;
      dh[e] = be.dentropy;
    }
    __syncthreads();
    for (int e = tid; e < nb * lay.nu; e += kThreads) {
      const int b = e / lay.nu, u = e % lay.nu;
      wu[e] = expand_entry(qp + b * d, qn + b * d, lay.u_bits, u);
    }
    for (int e = tid; e < nb * lay.nl; e += kThreads) {
      const int b = e / lay.nl, l = e % lay.nl;
      wl[e] = expand_entry(qp + b * d + lay.u_bits, qn + b * d + lay.u_bits, lay.l_bits, l);
    }
    __syncthreads();
    for (int e = tid; e < nb * lay.nu; e += kThreads) {
      const int b = e / lay.nu, u = e % lay.nu;
      const float* w = wl + b * lay.nl;
      float h = 0.0f;
      for (int l = 0; l < lay.nl; ++l) h = fmaf(GT[static_cast<int64_t>(l) * lay.nu + u], w[l], h);
      hu[e] = h;
    }
    for (int e = tid; e < nb * lay.nl; e += kThreads) {
      const int b = e / lay.nl, l = e % lay.nl;
      const float* w = wu + b * lay.nu;
      float h = 0.0f;
      for (int u = 0; u < lay.nu; ++u) h = fmaf(G[static_cast<int64_t>(u) * lay.nl + l], w[u], h);
      hl[e] = h;
    }
    __syncthreads();
    for (int e = tid; e < nb * d; e += kThreads) {
      const int b = e / d, i = e % d;
      const bool high = i < lay.u_bits;
      const int m = high ? lay.u_bits : lay.l_bits;
      const int j = high ? i : i - lay.u_bits;
      const float* qpb = qp + b * d + (high ? 0 : lay.u_bits);
      const float* qnb = qn + b * d + (high ? 0 : lay.u_bits);
      const float* h = high ? hu + b * lay.nu : hl + b * lay.nl;
      float r = 0.0f;
      for (int t = 0; t < (1 << m); ++t) {
        float w = 1.0f;
        for (int k = 0; k < m; ++k) {
          const bool bit = (t >> (m - 1 - k)) & 1;
          w *= k == j ? (bit ? 1.0f : -1.0f) : (bit ? qpb[k] : qnb[k]);
        }
        r = fmaf(w, h[t], r);
      }
      const float ga = gps[s0 + b] * dh[e] + inv_n * var[e] * r;
      grad_x[s0 * d + e] = cuda::from_float<T>(scale * ga);
    }
    __syncthreads();
  }
}

int backward_batch(const Layout& lay) {
  const int kb = 8192 / (2 * (lay.nu + lay.nl));
  return kb < 1 ? 1 : (kb > 16 ? 16 : kb);
}

}  // namespace

size_t lfq_entropy_cuda_workspace_bytes(int64_t n, int d, bool backward) {
  if (d < 1 || d > kLfqMaxEntropyDims) return 0;
  const size_t codes = size_t{1} << d;
  return backward ? codes * sizeof(float) : static_cast<size_t>(num_splits(n, d)) * codes * sizeof(double);
}

cudaError_t launch_lfq_quantize_cuda(const LfqQuantizeParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  if (p.d < 1 || p.d > kLfqMaxQuantizeDims) return cudaErrorInvalidValue;
  const unsigned int blocks = cuda::grid_blocks(cuda::ceil_div(p.n, kThreads));
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    lfq_quantize_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(p.x), static_cast<scalar_t*>(p.quantized), p.indices, p.n, p.d,
        static_cast<float>(p.codebook_scale));
    return cudaGetLastError();
  });
}

cudaError_t launch_lfq_entropy_cuda(const LfqEntropyParams& p, cudaStream_t stream) {
  if (p.d < 1 || p.d > kLfqMaxEntropyDims || p.workspace == nullptr) return cudaErrorInvalidValue;
  const Layout lay(p.d);
  const int64_t codes = int64_t{1} << p.d;
  const int splits = num_splits(p.n, p.d);
  const int64_t per_split = p.n == 0 ? 1 : (p.n + splits - 1) / splits;
  double* partial = static_cast<double*>(p.workspace);
  const float scale = static_cast<float>(p.logit_scale);
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    const auto* x = static_cast<const scalar_t*>(p.x);
    cudaError_t err;
    if (p.n > 0) {
      lfq_sample_entropy_kernel<scalar_t><<<cuda::grid_blocks(cuda::ceil_div(p.n, kThreads)), kThreads, 0, stream>>>(
          x, static_cast<float*>(p.per_sample_entropy), p.n, p.d, scale);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      lfq_probs_partial_kernel<scalar_t><<<dim3(lay.tiles, splits), kThreads, 0, stream>>>(
          x, p.n, p.d, scale, lay, per_split, partial);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    lfq_probs_reduce_kernel<<<cuda::ceil_div(codes, kThreads), kThreads, 0, stream>>>(
        partial, p.n == 0 ? 0 : splits, codes, p.n, static_cast<float*>(p.avg_probs));
    return cudaGetLastError();
  });
}

cudaError_t launch_lfq_entropy_backward_cuda(const LfqEntropyParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  if (p.d < 1 || p.d > kLfqMaxEntropyDims || p.workspace == nullptr) return cudaErrorInvalidValue;
  const Layout lay(p.d);
  const int64_t codes = int64_t{1} << p.d;
  float* gt = static_cast<float*>(p.workspace);
  const float* g = static_cast<const float*>(p.grad_avg_probs);
  transpose_kernel<<<cuda::ceil_div(codes, kThreads), kThreads, 0, stream>>>(g, gt, lay.nu, lay.nl);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int kb = backward_batch(lay);
  const size_t smem = static_cast<size_t>(kb) * (4 * p.d + 2 * lay.nu + 2 * lay.nl) * sizeof(float);
  const unsigned int blocks = cuda::grid_blocks((p.n + kb - 1) / kb, 8);
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    lfq_entropy_backward_kernel<scalar_t><<<blocks, kThreads, smem, stream>>>(
        static_cast<const scalar_t*>(p.x), p.n, p.d, static_cast<float>(p.logit_scale), lay, kb, g, gt,
        static_cast<const float*>(p.grad_per_sample), static_cast<scalar_t*>(p.grad_x));
    return cudaGetLastError();
  });
}

}  // namespace fastlatent
