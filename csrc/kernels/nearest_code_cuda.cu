// CUDA nearest_code. See nearest_code.h for the math and the tie/NaN rules.
//
// Every path first runs code_keys (one warp per code: alpha[k], beta[k] into the
// workspace), then one search kernel that writes the winning index of each row, then
// finish_rows (one warp per row: the non-finite-row rule and the exact fp32 distance).
//
// Search kernels, chosen by launch_nearest_code_cuda:
//   * small_d (d <= 32, any dtype): a thread owns one row, held in registers as fp32; the
//     block streams the codebook through shared memory in tiles of kSmallCodes codes, which
//     every thread reads at the same address (a broadcast). d FMAs per key plus a compare.
//   * tensor_core (fp16/bf16 with d % 8 == 0; fp32 with precision tf32 and d % 4 == 0; x and
//     codebook 16-byte aligned; an image built for sm_80+, or sm_70+ for fp16: see
//     nearest_code_cuda_path): WMMA tiles of kTcRows x kTcCodes (8 warps, each 32 x 64 of fp32
//     accumulators), the dims staged through shared memory kTcDims at a time; after a code
//     tile each warp parks one 16 x 16 accumulator at a time in shared memory and two lanes
//     per row fold its keys into their running minimum.
//   * simt (everything else, and fp32 by default: exact fp32 FMAs): 16 x 16 threads with a
//     4 x 4 register tile each, x and code tiles of kBD dims transposed in shared memory.
// Each path visits codes in increasing order per thread and reduces across threads with the
// total (NaN first, key, index) order, so the result is deterministic.
//
// These paths are written for correctness first; their tuning (cp.async pipelining, wgmma on
// sm_90a) waits for measurements on a GPU.
#include <mma.h>

#include <cmath>
#include <type_traits>

#include "cuda_utils.cuh"
#include "kernel_arch.cuh"
#include "nearest_code.h"

namespace fastlatent {
namespace {

// ------------------------------------------------------------------ shared pieces

template <typename T>
__global__ void code_keys_kernel(const T* __restrict__ codebook, int64_t k, int64_t d, Metric metric,
                                 float* __restrict__ alpha, float* __restrict__ beta) {
  const int64_t search = blockIdx.y;  // batched searches: one per gridDim.y
  codebook += search * k * d;
  alpha += search * k;
  beta += search * k;
  const int lane = threadIdx.x & 31;
  const int64_t code = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (code >= k) return;  // whole warps leave together: a warp shares one code
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

__device__ __forceinline__ void fold(float key, int64_t index, float& best_key, int64_t& best_index) {
  if (better(key, index, best_key, best_index)) {
    best_key = key;
    best_index = index;
  }
}

// Reduce (key, index) over the lanes that differ in the bits of `width - 1` (width <= 32).
__device__ __forceinline__ void reduce_lanes(float& key, int64_t& index, int width) {
  for (int offset = width / 2; offset > 0; offset >>= 1) {
    const float other_key = __shfl_xor_sync(0xffffffffu, key, offset);
    const int64_t other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    fold(other_key, other_index, key, index);
  }
}

// One warp per row: rows holding NaN/Inf get code 0 (all their keys are NaN), and the
// distance of the chosen code is recomputed exactly in fp32.
template <typename T>
__global__ void finish_rows_kernel(const T* __restrict__ x, const T* __restrict__ codebook, int64_t n,
                                   int64_t k, int64_t d, Metric metric, int64_t* __restrict__ indices,
                                   float* __restrict__ distances) {
  const int64_t search = blockIdx.y;
  x += search * n * d;
  codebook += search * k * d;
  indices += search * n;
  distances += search * n;
  const int lane = threadIdx.x & 31;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (row >= n) return;
  const T* x_row = x + row * d;
  bool finite = true;
  for (int64_t t = lane; t < d; t += 32) finite = finite && isfinite(cuda::to_float(x_row[t]));
  finite = __all_sync(0xffffffffu, finite);
  const int64_t index = finite ? indices[row] : 0;
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

// ------------------------------------------------------------------ simt path

constexpr int kBM = 64;        // rows of x per block
constexpr int kBN = 64;        // codes per tile
constexpr int kBD = 16;        // dims per shared-memory stage
constexpr int kThreads = 256;  // 16 x 16
constexpr int kPad = 4;

template <typename T>
__global__ void __launch_bounds__(kThreads)
simt_kernel(const T* __restrict__ x, const T* __restrict__ codebook, const float* __restrict__ alpha,
            const float* __restrict__ beta, int64_t n, int64_t k, int64_t d, int64_t* __restrict__ indices) {
  {  // batched searches: one per gridDim.y
    const int64_t search = blockIdx.y;
    x += search * n * d;
    codebook += search * k * d;
    alpha += search * k;
    beta += search * k;
    indices += search * n;
  }
  __shared__ float xs[kBD][kBM + kPad];
  __shared__ float cs[kBD][kBN + kPad];

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
      // 4 elements of each tile per thread, consecutive threads on consecutive dims
      // (coalesced). Out-of-range reads are 0, which leaves dot products unchanged.
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
      for (int i = 0; i < 4; ++i) fold(fmaf(a, acc[i][j], b), code, best_key[i], best_index[i]);
    }
  }

  // The 16 code lanes of a row are the 16 lanes of a half-warp.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    reduce_lanes(best_key[i], best_index[i], 16);
    const int64_t row = row0 + ty + 16 * i;
    if (tx == 0 && row < n) indices[row] = best_index[i];
  }
}

// ------------------------------------------------------------------ small-D path

constexpr int kSmallThreads = 256;  // rows per block, one per thread
constexpr int kSmallCodes = 256;    // codes per shared-memory tile

template <typename T, int DP>
__global__ void __launch_bounds__(kSmallThreads)
small_d_kernel(const T* __restrict__ x, const T* __restrict__ codebook, const float* __restrict__ alpha,
               const float* __restrict__ beta, int64_t n, int64_t k, int64_t d,
               int64_t* __restrict__ indices) {
  {  // batched searches: one per gridDim.y
    const int64_t search = blockIdx.y;
    x += search * n * d;
    codebook += search * k * d;
    alpha += search * k;
    beta += search * k;
    indices += search * n;
  }
  // Codes scaled by alpha, so that key = beta + <x, code>.
  __shared__ float codes[kSmallCodes][DP];
  __shared__ float betas[kSmallCodes];

  const int64_t row = static_cast<int64_t>(blockIdx.x) * kSmallThreads + threadIdx.x;
  float xr[DP];
#pragma unroll
  for (int t = 0; t < DP; ++t) xr[t] = (row < n && t < d) ? cuda::to_float(x[row * d + t]) : 0.0f;

  float best_key = INFINITY;
  int64_t best_index = 0;
  for (int64_t code0 = 0; code0 < k; code0 += kSmallCodes) {
    const int count = static_cast<int>(k - code0 < kSmallCodes ? k - code0 : kSmallCodes);
    for (int e = threadIdx.x; e < kSmallCodes * DP; e += kSmallThreads) {
      const int c = e / DP, t = e % DP;
      const int64_t code = code0 + c;
      codes[c][t] = (c < count && t < d) ? alpha[code] * cuda::to_float(codebook[code * d + t]) : 0.0f;
    }
    for (int c = threadIdx.x; c < kSmallCodes; c += kSmallThreads) betas[c] = c < count ? beta[code0 + c] : 0.0f;
    __syncthreads();
    for (int c = 0; c < count; ++c) {
      float key = betas[c];
#pragma unroll
      for (int t = 0; t < DP; ++t) key = fmaf(xr[t], codes[c][t], key);
      // Codes come in increasing order: a strict test keeps the lowest index on ties.
      if (key < best_key || (isnan(key) && !isnan(best_key))) {
        best_key = key;
        best_index = code0 + c;
      }
    }
    __syncthreads();
  }
  if (row < n) indices[row] = best_index;
}

// ------------------------------------------------------------------ tensor-core path

namespace wmma = nvcuda::wmma;

constexpr int kTcRows = 128;   // rows of x per block
constexpr int kTcCodes = 128;  // codes per tile
constexpr int kTcDims = 32;    // dims per shared-memory stage
constexpr int kTcWarps = 8;    // 4 along rows x 2 along codes, each 32 x 64
constexpr int kTcThreads = kTcWarps * 32;

// Whether this compilation pass has WMMA for T: fp16 from sm_70, bf16 and TF32 from sm_80 (the
// host pass declares every type). Kept in step with nearest_code_tensor_core_min_arch.
template <typename T>
#if defined(__CUDA_ARCH__)
constexpr bool kTcCompiled = __CUDA_ARCH__ >= (std::is_same_v<T, __half> ? 700 : 800);
#else
constexpr bool kTcCompiled = true;
#endif

template <typename T>
struct TcTraits;
template <>
struct TcTraits<__half> {
  using Frag = __half;
  static constexpr int kK = 16;
  static constexpr int kPad = 8;
  template <typename F>
  __device__ static void round(F&) {}
};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <>
struct TcTraits<__nv_bfloat16> {
  using Frag = __nv_bfloat16;
  static constexpr int kK = 16;
  static constexpr int kPad = 8;
  template <typename F>
  __device__ static void round(F&) {}
};
template <>
struct TcTraits<float> {
  using Frag = wmma::precision::tf32;
  static constexpr int kK = 8;
  static constexpr int kPad = 4;
  // WMMA's TF32 operands must be rounded to TF32 after loading.
  template <typename F>
  __device__ static void round(F& f) {
    for (int e = 0; e < f.num_elements; ++e) f.x[e] = wmma::__float_to_tf32(f.x[e]);
  }
};
#endif

// Copy a tile of `rows` x kTcDims elements (row-major source with row length d) to shared
// memory, 16 bytes per access, zero past the matrix. Requires d * sizeof(T) % 16 == 0 and a
// 16-byte aligned src (nearest_code_cuda_path checks both).
template <typename T, int kLd>
__device__ __forceinline__ void load_tile(T (*dst)[kLd], const T* __restrict__ src,
                                          int64_t first_row, int64_t num_rows, int64_t d, int64_t d0,
                                          int rows) {
  constexpr int kPerVector = 16 / sizeof(T);
  constexpr int kVectorsPerRow = kTcDims / kPerVector;
  for (int v = threadIdx.x; v < rows * kVectorsPerRow; v += kTcThreads) {
    const int r = v / kVectorsPerRow, t = (v % kVectorsPerRow) * kPerVector;
    const int64_t row = first_row + r, dim = d0 + t;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (row < num_rows && dim < d) value = *reinterpret_cast<const uint4*>(src + row * d + dim);
    *reinterpret_cast<uint4*>(&dst[r][t]) = value;
  }
}

// The body of tensor_core_kernel, instantiated only where kTcCompiled<T>.
template <typename T>
__device__ __forceinline__ void tensor_core_search(const T* __restrict__ x, const T* __restrict__ codebook,
                                                   const float* __restrict__ alpha, const float* __restrict__ beta,
                                                   int64_t n, int64_t k, int64_t d, int64_t* __restrict__ indices) {
  {  // batched searches: one per gridDim.y
    const int64_t search = blockIdx.y;
    x += search * n * d;
    codebook += search * k * d;
    alpha += search * k;
    beta += search * k;
    indices += search * n;
  }
  using Traits = TcTraits<T>;
  constexpr int kK = Traits::kK;
  constexpr int kLd = kTcDims + Traits::kPad;
  __shared__ __align__(32) T xs[kTcRows][kLd];
  __shared__ __align__(32) T cs[kTcCodes][kLd];
  __shared__ __align__(32) float park[kTcWarps][16][16];
  __shared__ float pair_key[kTcRows][2];
  __shared__ int64_t pair_index[kTcRows][2];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warp_row = warp >> 1;  // 0..3: rows warp_row * 32 .. + 32
  const int warp_code = warp & 1;  // 0..1: codes warp_code * 64 .. + 64
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTcRows;

  // Lane l follows rows (l / 2) and 16 + (l / 2) of the warp's 32, columns (l % 2) * 8 .. + 8
  // of each parked fragment.
  float best_key[2] = {INFINITY, INFINITY};
  int64_t best_index[2] = {0, 0};

  for (int64_t code0 = 0; code0 < k; code0 += kTcCodes) {
    wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    for (int64_t d0 = 0; d0 < d; d0 += kTcDims) {
      load_tile<T>(xs, x, row0, n, d, d0, kTcRows);
      load_tile<T>(cs, codebook, code0, k, d, d0, kTcCodes);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTcDims; kk += kK) {
        wmma::fragment<wmma::matrix_a, 16, 16, kK, typename Traits::Frag, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, kK, typename Traits::Frag, wmma::col_major> b[4];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(a[i], &xs[warp_row * 32 + i * 16][kk], kLd);
          Traits::round(a[i]);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          // B(kk, code) = codebook[code][kk]: the code tile read column-major.
          wmma::load_matrix_sync(b[j], &cs[warp_code * 64 + j * 16][kk], kLd);
          Traits::round(b[j]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }

    // Epilogue: fold this code tile's keys into the lanes' running minima. Fragments are
    // visited with increasing codes (j), and within one by increasing column.
    const int r_local = lane >> 1, c_base = (lane & 1) * 8;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::store_matrix_sync(&park[warp][0][0], acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const int64_t code = code0 + warp_code * 64 + j * 16 + c_base + c;
          if (code < k) fold(fmaf(alpha[code], park[warp][r_local][c_base + c], beta[code]), code,
                             best_key[i], best_index[i]);
        }
        __syncwarp();
      }
    }
  }

  // Lanes 2r and 2r + 1 share a row; then the two warps along codes share it.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    reduce_lanes(best_key[i], best_index[i], 2);
    if ((lane & 1) == 0) {
      const int r = warp_row * 32 + i * 16 + (lane >> 1);
      pair_key[r][warp_code] = best_key[i];
      pair_index[r][warp_code] = best_index[i];
    }
  }
  __syncthreads();
  for (int r = threadIdx.x; r < kTcRows; r += kTcThreads) {
    float key = pair_key[r][0];
    int64_t index = pair_index[r][0];
    fold(pair_key[r][1], pair_index[r][1], key, index);
    if (row0 + r < n) indices[row0 + r] = index;
  }
}

template <typename T>
__global__ void __launch_bounds__(kTcThreads)
tensor_core_kernel(const T* __restrict__ x, const T* __restrict__ codebook, const float* __restrict__ alpha,
                   const float* __restrict__ beta, int64_t n, int64_t k, int64_t d,
                   int64_t* __restrict__ indices) {
  if constexpr (kTcCompiled<T>) {
    tensor_core_search<T>(x, codebook, alpha, beta, n, k, d, indices);
  } else {
    __trap();  // not reached: nearest_code_cuda_path sends calls on such an image to the SIMT path
  }
}

// ------------------------------------------------------------------ dispatch

template <typename T>
cudaError_t launch_small_d(const NearestCodeParams& p, const T* x, const T* codebook, const float* alpha,
                           const float* beta, cudaStream_t stream) {
  const dim3 grid(cuda::ceil_div(p.n, kSmallThreads), static_cast<unsigned int>(p.batch));
  if (p.d <= 8) {
    small_d_kernel<T, 8><<<grid, kSmallThreads, 0, stream>>>(x, codebook, alpha, beta, p.n, p.k, p.d, p.indices);
  } else if (p.d <= 16) {
    small_d_kernel<T, 16><<<grid, kSmallThreads, 0, stream>>>(x, codebook, alpha, beta, p.n, p.k, p.d, p.indices);
  } else {
    small_d_kernel<T, 32><<<grid, kSmallThreads, 0, stream>>>(x, codebook, alpha, beta, p.n, p.k, p.d, p.indices);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const NearestCodeParams& p, cudaStream_t stream) {
  float* alpha = static_cast<float*>(p.workspace);
  float* beta = alpha + p.batch * p.k;
  const T* x = static_cast<const T*>(p.x);
  const T* codebook = static_cast<const T*>(p.codebook);
  int arch = 0;
  // Which tensor-core kernel body this device runs: the WMMA search or the trap.
  cudaError_t err = p.d > 32 ? cuda::kernel_image_arch<tensor_core_kernel<T>>(&arch) : cudaSuccess;
  if (err != cudaSuccess) return err;
  const NearestCodeCudaPath path = nearest_code_cuda_path(p, arch);

  constexpr int kWarpThreads = 256;  // 8 warps: 8 codes or 8 rows per block
  const unsigned int searches = static_cast<unsigned int>(p.batch);
  code_keys_kernel<T><<<dim3(cuda::ceil_div(p.k * 32, kWarpThreads), searches), kWarpThreads, 0, stream>>>(
      codebook, p.k, p.d, p.metric, alpha, beta);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  switch (path) {
    case NearestCodeCudaPath::kSmallD:
      err = launch_small_d<T>(p, x, codebook, alpha, beta, stream);
      break;
    case NearestCodeCudaPath::kTensorCore:
      tensor_core_kernel<T><<<dim3(cuda::ceil_div(p.n, kTcRows), searches), kTcThreads, 0, stream>>>(
          x, codebook, alpha, beta, p.n, p.k, p.d, p.indices);
      err = cudaGetLastError();
      break;
    case NearestCodeCudaPath::kSimt:
      simt_kernel<T><<<dim3(cuda::ceil_div(p.n, kBM), searches), kThreads, 0, stream>>>(x, codebook, alpha, beta, p.n,
                                                                                       p.k, p.d, p.indices);
      err = cudaGetLastError();
      break;
  }
  if (err != cudaSuccess) return err;

  finish_rows_kernel<T><<<dim3(cuda::ceil_div(p.n * 32, kWarpThreads), searches), kWarpThreads, 0, stream>>>(
      x, codebook, p.n, p.k, p.d, p.metric, p.indices, p.distances);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_nearest_code_cuda(const NearestCodeParams& params, cudaStream_t stream) {
  if (params.n == 0 || params.batch == 0) return cudaSuccess;
  if (params.k < 1 || params.d < 1 || params.workspace == nullptr || params.batch < 0 || params.batch > 65535)
    return cudaErrorInvalidValue;
  return FL_CUDA_DTYPE_SWITCH(params.dtype, scalar_t, cudaErrorInvalidValue,
                              [&] { return launch_typed<scalar_t>(params, stream); });
}

}  // namespace fastlatent
