// CUDA LFQ: quantize, entropy and its backward. See lfq.h for the math and the NaN rules.
//
// quantize: one thread per row (grid stride), d <= 62 elements, int64 index from the bits.
// entropy forward, three kernels:
//   1. per-sample entropies, one thread per row;
//   2. avg_probs partial sums: grid (tiles of tile_u rows of the 2^U x 2^L matrix) x (fixed
//      sample splits). A block walks its split in batches of kBatch samples: it computes the
//      Bernoulli probabilities of the batch, expands wL (all 2^L columns, 8 entries per thread
//      step) and wU (its tile_u rows) into shared memory, and each thread adds
//      sum_b wU[b][u] wL[b][l] for its register tile of kMaxPerThread (u, l) entries (1-2
//      columns x 8-16 rows) into fp64 registers, fp32 within a batch. At d = 18 a tile is 8 x 512
//      (64 tiles): each expansion serves 4,096 FMAs per sample;
//   3. one thread per avg_probs entry sums the splits in order and divides by N.
//   No atomics: deterministic. Workspace: splits x 2^d doubles (capped at 16 MiB).
// entropy backward: one kernel over blocks of kBwdSamples samples (grid stride), all in shared memory:
//   Bernoullis -> wU, wL -> hU = wL G^T and hL = wU G (a thread per u / l entry, the block's samples in
//   registers: each G element is read once per block, coalesced; G^T is prepared in the workspace by a
//   transpose kernel) -> leave-one-out sums, one thread per (sample, dim) -> dL/dx.
#include <cmath>

#include "cuda_utils.cuh"
#include "sign_quantize.cuh"
#include "lfq.h"

namespace fastlatent {
namespace {

constexpr int kThreads = 256;
constexpr int kBatch = 16;          // samples per batch in the avg_probs kernel
constexpr int kMaxPerThread = 16;   // (u, l) entries per thread in the avg_probs kernel (a register tile)
constexpr int kMaxL = 1 << (kLfqMaxEntropyDims / 2);
constexpr int kMaxTileU = 128;
static_assert(kMaxL <= 2 * kThreads, "at most two columns per thread");
constexpr size_t kMaxPartialBytes = size_t{16} << 20;

struct Layout {
  int u_bits, l_bits, nu, nl, tile_u, tiles;
  explicit Layout(int d)
      : u_bits(d - d / 2), l_bits(d / 2), nu(1 << (d - d / 2)), nl(1 << (d / 2)) {
    // Rows of a tile: kMaxPerThread / columns per thread, times the row groups of the block (threads
    // beyond nl columns), at most kMaxTileU.
    tile_u = nl > kThreads ? kMaxPerThread * kThreads / nl : kMaxPerThread * (kThreads / nl);
    tile_u = tile_u > kMaxTileU ? kMaxTileU : tile_u;
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
  cuda::sign_quantize_rows</*kRowNan=*/false>(x, out, indices, n, d, scale);
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

// wl[0 .. 8) = entries 8 g .. 8 g + 8 of an m-bit expansion (m >= 3): the product over the top m - 3 bits once,
// then a register tree over the last three. Left-to-right products, as expand_entry and the CPU's expand:
// the same fp32 values, at 2.5 multiplications per entry instead of m.
__device__ __forceinline__ void expand_group8(const float* qp, const float* qn, int m, int g, float* w) {
  float prefix = 1.0f;
  for (int j = 0; j < m - 3; ++j) prefix *= ((g >> (m - 4 - j)) & 1) ? qp[j] : qn[j];
  const float a0 = prefix * qn[m - 3], a1 = prefix * qp[m - 3];
  const float b0 = a0 * qn[m - 2], b1 = a0 * qp[m - 2], b2 = a1 * qn[m - 2], b3 = a1 * qp[m - 2];
  const float lo = qn[m - 1], hi = qp[m - 1];
  *reinterpret_cast<float4*>(w) = make_float4(b0 * lo, b0 * hi, b1 * lo, b1 * hi);
  *reinterpret_cast<float4*>(w + 4) = make_float4(b2 * lo, b2 * hi, b3 * lo, b3 * hi);
}

// avg_probs partial sums over one split of the samples for one tile of tile_u rows of the 2^U x 2^L matrix.
// Thread t owns kCols columns (l = t mod min(nl, 256) + 256 c) and kRows consecutive rows of the tile
// (row group t / min(nl, 256)): per sample it reads kCols wl values and kRows wu values (broadcast, 16-byte
// loads) for kRows x kCols FMAs. Per batch of kBatch samples the block computes the Bernoullis once,
// expands wl (all nl columns, 8 at a time) and wu (its rows); a tile of 8 rows x 512 columns at d = 18
// (64 tiles) does 4,096 FMAs per sample against one 512-entry expansion (was 1,024 per expansion).
// Each entry sums a batch in fp32 in sample order, batches in fp64: fixed order, deterministic.
// Two blocks per SM (128 registers; without the minimum, ptxas held this kernel to 64 and spilled).
template <typename T, int kCols>
__global__ void __launch_bounds__(kThreads, 2)
lfq_probs_partial_kernel(const T* __restrict__ x, int64_t n, int d, float scale, Layout lay,
                         int64_t samples_per_split, double* __restrict__ partial) {
  constexpr int kRows = kMaxPerThread / kCols;
  static_assert(kRows % 4 == 0, "wu rows are read 4 at a time");
  __shared__ float qp[kBatch][kLfqMaxEntropyDims], qn[kBatch][kLfqMaxEntropyDims];
  __shared__ __align__(16) float wl[kBatch][kMaxL];
  __shared__ __align__(16) float wu[kBatch][kMaxTileU];
  const int tid = threadIdx.x;
  const int col_threads = lay.nl < kThreads ? lay.nl : kThreads;
  const int col = tid % col_threads, row_first = (tid / col_threads) * kRows;
  const int u0 = blockIdx.x * lay.tile_u;
  const int tile_u = lay.nu - u0 < lay.tile_u ? lay.nu - u0 : lay.tile_u;
  const int wu_rows = (tile_u + kRows - 1) / kRows * kRows;  // whole row groups; rows past tile_u are 0
  const bool active = row_first < tile_u;
  const int64_t s_begin = static_cast<int64_t>(blockIdx.y) * samples_per_split;
  const int64_t s_end = n < s_begin + samples_per_split ? n : s_begin + samples_per_split;

  double acc[kRows][kCols];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = 0.0;

  for (int64_t s0 = s_begin; s0 < s_end; s0 += kBatch) {
    const int nb = static_cast<int>(s_end - s0 < kBatch ? s_end - s0 : kBatch);
    for (int e = tid; e < nb * d; e += kThreads) {
      const int b = e / d, i = e % d;
      const cuda::Bernoulli be = cuda::bernoulli(scale * cuda::to_float(x[(s0 + b) * d + i]));
      qp[b][i] = be.qpos;
      qn[b][i] = be.qneg;
    }
    __syncthreads();
    if (lay.l_bits >= 3) {
      const int groups = lay.nl / 8;
      for (int e = tid; e < nb * groups; e += kThreads) {
        const int b = e / groups, g = e % groups;
        expand_group8(&qp[b][lay.u_bits], &qn[b][lay.u_bits], lay.l_bits, g, &wl[b][8 * g]);
      }
    } else {
      for (int e = tid; e < nb * lay.nl; e += kThreads) {
        const int b = e / lay.nl, l = e % lay.nl;
        wl[b][l] = expand_entry(&qp[b][lay.u_bits], &qn[b][lay.u_bits], lay.l_bits, l);
      }
    }
    for (int e = tid; e < nb * wu_rows; e += kThreads) {
      const int b = e / wu_rows, ul = e % wu_rows;
      wu[b][ul] = ul < tile_u ? expand_entry(qp[b], qn[b], lay.u_bits, u0 + ul) : 0.0f;
    }
    __syncthreads();
    if (active) {
      float t[kRows][kCols];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int c = 0; c < kCols; ++c) t[r][c] = 0.0f;
      for (int b = 0; b < nb; ++b) {
        float wc[kCols], wr[kRows];
#pragma unroll
        for (int c = 0; c < kCols; ++c) wc[c] = wl[b][col + c * kThreads];
#pragma unroll
        for (int r = 0; r < kRows; r += 4) {
          const float4 v = *reinterpret_cast<const float4*>(&wu[b][row_first + r]);
          wr[r] = v.x;
          wr[r + 1] = v.y;
          wr[r + 2] = v.z;
          wr[r + 3] = v.w;
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int c = 0; c < kCols; ++c) t[r][c] = fmaf(wr[r], wc[c], t[r][c]);
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[r][c] += static_cast<double>(t[r][c]);
    }
    __syncthreads();
  }
  if (!active) return;
  double* out = partial + static_cast<int64_t>(blockIdx.y) * (static_cast<int64_t>(lay.nu) * lay.nl) +
                static_cast<int64_t>(u0) * lay.nl;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int row = row_first + r;
      if (row < tile_u) out[static_cast<int64_t>(row) * lay.nl + col + c * kThreads] = acc[r][c];
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

// Samples per block of the backward: each G element read from L2 serves all of them (8 x (4 d + nu + nl) floats
// of shared memory: 35 KB at d = 18).
constexpr int kBwdSamples = 8;
constexpr int kBwdPerThread = kMaxL / kThreads;  // h entries (u or l) per thread at d = 18

template <typename T>
__global__ void __launch_bounds__(kThreads)
lfq_entropy_backward_kernel(const T* __restrict__ x, int64_t n, int d, float scale, Layout lay,
                            const float* __restrict__ G, const float* __restrict__ GT,
                            const float* __restrict__ gps, T* __restrict__ grad_x) {
  extern __shared__ float smem[];
  float* qp = smem;                         // [kBwdSamples][d]
  float* qn = qp + kBwdSamples * d;         // [kBwdSamples][d]
  float* var = qn + kBwdSamples * d;        // [kBwdSamples][d]
  float* dh = var + kBwdSamples * d;        // [kBwdSamples][d]
  float* wu = dh + kBwdSamples * d;         // [nu][kBwdSamples], then hU (a G element's samples adjacent)
  float* wl = wu + kBwdSamples * lay.nu;    // [nl][kBwdSamples], then hL
  const int tid = threadIdx.x;
  const float inv_n = 1.0f / static_cast<float>(n);
  const int64_t num_blocks = (n + kBwdSamples - 1) / kBwdSamples;
  for (int64_t blk = blockIdx.x; blk < num_blocks; blk += gridDim.x) {
    const int64_t s0 = blk * kBwdSamples;
    const int nb = static_cast<int>(n - s0 < kBwdSamples ? n - s0 : kBwdSamples);
    for (int e = tid; e < nb * d; e += kThreads) {
      const cuda::Bernoulli be = cuda::bernoulli(scale * cuda::to_float(x[s0 * d + e]));
      qp[e] = be.qpos;
      qn[e] = be.qneg;
      var[e] = be.var;
      dh[e] = be.dentropy;
    }
    __syncthreads();
    // Rows of samples past nb are zero: the register loops below run over all kBwdSamples.
    for (int e = tid; e < kBwdSamples * lay.nu; e += kThreads) {
      const int b = e / lay.nu, u = e % lay.nu;
      wu[u * kBwdSamples + b] = b < nb ? expand_entry(qp + b * d, qn + b * d, lay.u_bits, u) : 0.0f;
    }
    for (int e = tid; e < kBwdSamples * lay.nl; e += kThreads) {
      const int b = e / lay.nl, l = e % lay.nl;
      wl[l * kBwdSamples + b] =
          b < nb ? expand_entry(qp + b * d + lay.u_bits, qn + b * d + lay.u_bits, lay.l_bits, l) : 0.0f;
    }
    __syncthreads();
    // hU[b][u] = sum_l G^T[l][u] wL[b][l] and hL[b][l] = sum_u G[u][l] wU[b][u]: thread t owns u (and l) =
    // t + 256 p, reads each G element once (coalesced) for the block's samples and keeps their sums in
    // registers (the samples' weights of one l or u: two 16-byte broadcast loads per 8 FMAs); each sum runs
    // over l (u) in increasing order from 0, as one thread per (sample, entry) did.
    float hu[kBwdPerThread][kBwdSamples], hl[kBwdPerThread][kBwdSamples];
#pragma unroll
    for (int q = 0; q < kBwdPerThread; ++q)
#pragma unroll
      for (int b = 0; b < kBwdSamples; ++b) hu[q][b] = hl[q][b] = 0.0f;
#pragma unroll
    for (int q = 0; q < kBwdPerThread; ++q) {
      const int u = tid + q * kThreads;
      if (u < lay.nu) {
        for (int l = 0; l < lay.nl; ++l) {
          const float g = GT[static_cast<int64_t>(l) * lay.nu + u];
          const float4 w0 = *reinterpret_cast<const float4*>(wl + l * kBwdSamples);
          const float4 w1 = *reinterpret_cast<const float4*>(wl + l * kBwdSamples + 4);
          const float w[kBwdSamples] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
          for (int b = 0; b < kBwdSamples; ++b) hu[q][b] = fmaf(g, w[b], hu[q][b]);
        }
      }
      const int l = tid + q * kThreads;
      if (l < lay.nl) {
        for (int u2 = 0; u2 < lay.nu; ++u2) {
          const float g = G[static_cast<int64_t>(u2) * lay.nl + l];
          const float4 w0 = *reinterpret_cast<const float4*>(wu + u2 * kBwdSamples);
          const float4 w1 = *reinterpret_cast<const float4*>(wu + u2 * kBwdSamples + 4);
          const float w[kBwdSamples] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
          for (int b = 0; b < kBwdSamples; ++b) hl[q][b] = fmaf(g, w[b], hl[q][b]);
        }
      }
    }
    __syncthreads();  // every thread is done reading wU, wL: their space takes hU, hL
#pragma unroll
    for (int q = 0; q < kBwdPerThread; ++q) {
      const int e = tid + q * kThreads;
#pragma unroll
      for (int b = 0; b < kBwdSamples; ++b) {
        if (e < lay.nu) wu[e * kBwdSamples + b] = hu[q][b];
        if (e < lay.nl) wl[e * kBwdSamples + b] = hl[q][b];
      }
    }
    __syncthreads();
    for (int e = tid; e < nb * d; e += kThreads) {
      const int b = e / d, i = e % d;
      const bool high = i < lay.u_bits;
      const int m = high ? lay.u_bits : lay.l_bits;
      const int j = high ? i : i - lay.u_bits;
      const float* qpb = qp + b * d + (high ? 0 : lay.u_bits);
      const float* qnb = qn + b * d + (high ? 0 : lay.u_bits);
      const float* h = (high ? wu : wl) + b;  // h[t * kBwdSamples]
      float r = 0.0f;
      for (int t = 0; t < (1 << m); ++t) {
        float w = 1.0f;
        for (int k = 0; k < m; ++k) {
          const bool bit = (t >> (m - 1 - k)) & 1;
          w *= k == j ? (bit ? 1.0f : -1.0f) : (bit ? qpb[k] : qnb[k]);
        }
        r = fmaf(w, h[t * kBwdSamples], r);
      }
      const float ga = gps[s0 + b] * dh[e] + inv_n * var[e] * r;
      grad_x[s0 * d + e] = cuda::from_float<T>(scale * ga);
    }
    __syncthreads();
  }
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
  const unsigned int blocks = cuda::sign_quantize_blocks(p.n, p.d, kThreads);
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
      if (lay.nl > kThreads) {
        lfq_probs_partial_kernel<scalar_t, 2><<<dim3(lay.tiles, splits), kThreads, 0, stream>>>(
            x, p.n, p.d, scale, lay, per_split, partial);
      } else {
        lfq_probs_partial_kernel<scalar_t, 1><<<dim3(lay.tiles, splits), kThreads, 0, stream>>>(
            x, p.n, p.d, scale, lay, per_split, partial);
      }
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
  const size_t smem = static_cast<size_t>(kBwdSamples) * (4 * p.d + lay.nu + lay.nl) * sizeof(float);
  const unsigned int blocks = cuda::grid_blocks((p.n + kBwdSamples - 1) / kBwdSamples, 8);
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    lfq_entropy_backward_kernel<scalar_t><<<blocks, kThreads, smem, stream>>>(
        static_cast<const scalar_t*>(p.x), p.n, p.d, static_cast<float>(p.logit_scale), lay, g, gt,
        static_cast<const float*>(p.grad_per_sample), static_cast<scalar_t*>(p.grad_x));
    return cudaGetLastError();
  });
}

}  // namespace fastlatent
