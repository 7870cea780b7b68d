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
//     accumulators); stages of 64 bytes of dims per row (32 fp16/bf16, 16 fp32) double-buffered
//     with cp.async, alpha/beta of each code tile staged in shared memory; after a code tile each
//     warp parks 32 x 16 keys at a time (conflict-free pitch) and lane r folds row r. Two blocks
//     per SM (128 registers) for every type.
//   * simt (everything else, and fp32 by default: exact fp32 FMAs): 16 x 16 threads with a
//     4 x 4 register tile each, x and code tiles of kBD dims transposed in shared memory.
// Each path visits codes in increasing order per thread and reduces across threads with the
// total (NaN first, key, index) order, so the result is deterministic.
//
// Not yet measured on a GPU; wgmma on sm_90a is the next step for the tensor-core path.
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

// Batched searches, one per gridDim.y: moves the block's pointers to its search (x [n, d], codebook
// [k, d], alpha and beta [k], indices [n] per search). Used by the simt, small-d and tensor-core paths.
template <typename T>
__device__ __forceinline__ void to_search(const T* __restrict__& x, const T* __restrict__& codebook,
                                          const float* __restrict__& alpha, const float* __restrict__& beta,
                                          int64_t* __restrict__& indices, int64_t n, int64_t k, int64_t d) {
  const int64_t search = blockIdx.y;
  x += search * n * d;
  codebook += search * k * d;
  alpha += search * k;
  beta += search * k;
  indices += search * n;
}

constexpr int kBM = 64;        // rows of x per block
constexpr int kBN = 64;        // codes per tile
constexpr int kBD = 16;        // dims per shared-memory stage
constexpr int kThreads = 256;  // 16 x 16
constexpr int kPad = 4;

template <typename T>
__global__ void __launch_bounds__(kThreads)
simt_kernel(const T* __restrict__ x, const T* __restrict__ codebook, const float* __restrict__ alpha,
            const float* __restrict__ beta, int64_t n, int64_t k, int64_t d, int64_t* __restrict__ indices) {
  to_search(x, codebook, alpha, beta, indices, n, k, d);
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

// The d = 32 tile fill on sm_90 takes 32-bit offsets from a per-tile pointer (d <= 32 fits): with the
// 64-bit code * d, ptxas (nvcc 13.0) capped the fp16/bf16 instantiations at 64 registers and spilled 4
// bytes, a value live across the tile loop. Where the 64-bit form does not spill (sm_80: 80 registers) it
// stays: there the 32-bit one drops to 64 registers but ptxas moves the search loop's counter to uniform
// registers, 56 instead of 51 instructions per code; smaller d on sm_90 keeps it too (a register move per
// two codes otherwise). The emulator runs the 32-bit form, so both forms are executed by the tests (the
// 64-bit one through d <= 16).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900 || defined(FL_EMULATION))
constexpr bool kSmallFillTileOffsets = true;
#else
constexpr bool kSmallFillTileOffsets = false;
#endif

template <typename T, int DP>
__global__ void __launch_bounds__(kSmallThreads)
small_d_kernel(const T* __restrict__ x, const T* __restrict__ codebook, const float* __restrict__ alpha,
               const float* __restrict__ beta, int64_t n, int64_t k, int64_t d,
               int64_t* __restrict__ indices) {
  to_search(x, codebook, alpha, beta, indices, n, k, d);
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
    if constexpr (DP == 32 && kSmallFillTileOffsets) {
      const T* tile = codebook + code0 * d;
      const float* tile_alpha = alpha + code0;
      const int tile_d = static_cast<int>(d);
      for (int e = threadIdx.x; e < kSmallCodes * DP; e += kSmallThreads) {
        const int c = e / DP, t = e % DP;
        codes[c][t] = (c < count && t < tile_d) ? tile_alpha[c] * cuda::to_float(tile[c * tile_d + t]) : 0.0f;
      }
    } else {
      for (int e = threadIdx.x; e < kSmallCodes * DP; e += kSmallThreads) {
        const int c = e / DP, t = e % DP;
        const int64_t code = code0 + c;
        codes[c][t] = (c < count && t < d) ? alpha[code] * cuda::to_float(codebook[code * d + t]) : 0.0f;
      }
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
constexpr int kTcWarps = 8;    // 4 along rows x 2 along codes, each 32 x 64
constexpr int kTcThreads = kTcWarps * 32;
// A stage holds kTcRows rows of x and kTcCodes codes, Traits::kDims dims each, at a row pitch of
// 80 bytes (16 bytes of padding: ldmatrix/WMMA row reads of 8 rows hit 8 distinct 16-byte bank groups).
constexpr int kTcPitchBytes = 80;
constexpr int kTcStageBytes = (kTcRows + kTcCodes) * kTcPitchBytes;  // 20,480
// The epilogue parks a warp's 32 rows x 16 codes of keys at a pitch of 20 floats in the stage buffer
// it has just consumed: lane r reads row r with 16-byte loads; the 8 lanes of each quarter-warp start
// at banks 20 r mod 32 = {0, 20, 8, 28, 16, 4, 24, 12} and cover all 32 banks once (no conflict).
constexpr int kParkLd = 20;
static_assert(kTcWarps * 32 * kParkLd * 4 == kTcStageBytes, "the parked keys fill one stage buffer");

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
  static constexpr int kDims = 32;  // dims per stage
  template <typename F>
  __device__ static void round(F&) {}
};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <>
struct TcTraits<__nv_bfloat16> {
  using Frag = __nv_bfloat16;
  static constexpr int kK = 16;
  static constexpr int kDims = 32;
  template <typename F>
  __device__ static void round(F&) {}
};
template <>
struct TcTraits<float> {
  using Frag = wmma::precision::tf32;
  static constexpr int kK = 8;
  static constexpr int kDims = 16;  // 64 bytes per row, as for fp16/bf16: same stage size
  // WMMA's TF32 operands must be rounded to TF32 after loading.
  template <typename F>
  __device__ static void round(F& f) {
    for (int e = 0; e < f.num_elements; ++e) f.x[e] = wmma::__float_to_tf32(f.x[e]);
  }
};
#endif

// 16 bytes global -> shared: cp.async from sm_80 (lands at the next cp_async_wait), a plain copy on the
// sm_70/75 images of the fp16 path (the waits are then no-ops and the pipeline degenerates to one stage).
__device__ __forceinline__ void tc_copy16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
#else
  cuda::cp_async16(smem, gmem);
#endif
}
__device__ __forceinline__ void tc_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  cuda::cp_async_commit();
#endif
}
__device__ __forceinline__ void tc_wait_all() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  cuda::cp_async_wait<0>();
#endif
}

// Start copying one stage (x rows row0.., codes code0.., dims d0 .. d0 + kDims) into `buf`, 16 bytes per
// access; vectors past the matrix are stored as zeros (which leave the dot products unchanged). Requires
// d * sizeof(T) % 16 == 0 and 16-byte aligned x and codebook (nearest_code_cuda_path checks both).
template <typename T>
__device__ __forceinline__ void tc_load_stage(unsigned char* buf, const T* __restrict__ x,
                                              const T* __restrict__ codebook, int64_t row0, int64_t n,
                                              int64_t code0, int64_t k, int64_t d, int64_t d0) {
  constexpr int kPerVector = 16 / sizeof(T);
  constexpr int kVectorsPerRow = TcTraits<T>::kDims / kPerVector;  // 4
  constexpr int kRowsPerPass = kTcThreads / kVectorsPerRow;        // 64
  static_assert(kTcRows % kRowsPerPass == 0 && kTcCodes % kRowsPerPass == 0, "whole passes");
  const int r0 = threadIdx.x / kVectorsPerRow, t = (threadIdx.x % kVectorsPerRow) * kPerVector;
  const bool dim_ok = d0 + t < d;
  const T* src = x + (row0 + r0) * d + d0 + t;
  unsigned char* dst = buf + r0 * kTcPitchBytes + t * static_cast<int>(sizeof(T));
#pragma unroll
  for (int s = 0; s < kTcRows / kRowsPerPass; ++s) {
    void* to = dst + s * kRowsPerPass * kTcPitchBytes;
    if (dim_ok && row0 + r0 + s * kRowsPerPass < n) {
      tc_copy16(to, src + s * kRowsPerPass * d);
    } else {
      *static_cast<uint4*>(to) = make_uint4(0, 0, 0, 0);
    }
  }
  src = codebook + (code0 + r0) * d + d0 + t;
  dst += kTcRows * kTcPitchBytes;
#pragma unroll
  for (int s = 0; s < kTcCodes / kRowsPerPass; ++s) {
    void* to = dst + s * kRowsPerPass * kTcPitchBytes;
    if (dim_ok && code0 + r0 + s * kRowsPerPass < k) {
      tc_copy16(to, src + s * kRowsPerPass * d);
    } else {
      *static_cast<uint4*>(to) = make_uint4(0, 0, 0, 0);
    }
  }
}

// The body of tensor_core_kernel, instantiated only where kTcCompiled<T>.
//
// The block walks stages (code tile, dim chunk) with the codebook's dims innermost; stage s + 1 is in
// flight (cp.async, double-buffered) while the warps run stage s's MMAs and, after a code tile's last
// chunk, its epilogue. alpha/beta of a code tile are staged in shared memory with its first chunk.
// Epilogue: each warp parks 32 rows x 16 codes of dot products at a time in the stage buffer it has just
// consumed, and lane r folds row r's 16 keys into its running minimum. A lane sees its row's codes in
// increasing order, so a strict `<` keeps the lowest index on ties; the two warps along codes then merge
// with the total (NaN first, key, index) order.
template <typename T>
__device__ __forceinline__ void tensor_core_search(const T* __restrict__ x, const T* __restrict__ codebook,
                                                   const float* __restrict__ alpha, const float* __restrict__ beta,
                                                   int64_t n, int64_t k, int64_t d, int64_t* __restrict__ indices) {
  to_search(x, codebook, alpha, beta, indices, n, k, d);
  using Traits = TcTraits<T>;
  constexpr int kK = Traits::kK;
  constexpr int kDims = Traits::kDims;
  constexpr int kLd = kTcPitchBytes / sizeof(T);  // elements per staged row
  static_assert(kDims * sizeof(T) == 64, "a staged row is 64 bytes of data and 16 of padding");
  __shared__ __align__(128) unsigned char stage_mem[2][kTcStageBytes];
  __shared__ __align__(16) float tile_alpha[2][kTcCodes];  // by code-tile parity
  __shared__ __align__(16) float tile_beta[2][kTcCodes];
  __shared__ float pair_key[kTcRows][2];
  __shared__ int64_t pair_index[kTcRows][2];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warp_row = warp >> 1;  // 0..3: rows warp_row * 32 .. + 32
  const int warp_code = warp & 1;  // 0..1: codes warp_code * 64 .. + 64
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTcRows;

  // alpha/beta of the tile at code0 (a plain load per thread; read after the next __syncthreads). Codes
  // past k get key = 0 * 0 + inf, which a strict `<` against the initial +inf never takes.
  auto stage_norms = [&](int parity, int64_t code0) {
    const int c = threadIdx.x & (kTcCodes - 1);
    const int64_t code = code0 + c;
    if (threadIdx.x < kTcCodes) {
      tile_alpha[parity][c] = code < k ? alpha[code] : 0.0f;
    } else {
      tile_beta[parity][c] = code < k ? beta[code] : INFINITY;
    }
  };
  static_assert(kTcThreads == 2 * kTcCodes, "one thread per code for alpha, one for beta");

  // Lane l follows row warp_row * 32 + l.
  float best_key = INFINITY;
  int64_t best_index = 0;

  const int chunks = static_cast<int>((d + kDims - 1) / kDims);  // d < 2^31 (a row's length)
  const int64_t stages = ((k + kTcCodes - 1) / kTcCodes) * chunks;
  tc_load_stage<T>(stage_mem[0], x, codebook, row0, n, 0, k, d, 0);
  stage_norms(0, 0);
  tc_commit();

  wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc[2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  int chunk = 0, tile_parity = 0;
  int64_t code0 = 0;
  for (int64_t s = 0; s < stages; ++s) {
    const int buf = static_cast<int>(s & 1);
    tc_wait_all();
    __syncthreads();  // stage s is visible; every warp is done with stage s - 1's buffer and its park
    {
      const bool next_tile = chunk + 1 == chunks;
      const int64_t next_code0 = next_tile ? code0 + kTcCodes : code0;
      const int64_t next_d0 = next_tile ? 0 : static_cast<int64_t>(chunk + 1) * kDims;
      if (s + 1 < stages) {
        tc_load_stage<T>(stage_mem[buf ^ 1], x, codebook, row0, n, next_code0, k, d, next_d0);
        if (next_tile) stage_norms(tile_parity ^ 1, next_code0);
      }
      tc_commit();
    }

    const T (*xs)[kLd] = reinterpret_cast<const T (*)[kLd]>(stage_mem[buf]);
    const T (*cs)[kLd] = reinterpret_cast<const T (*)[kLd]>(stage_mem[buf] + kTcRows * kTcPitchBytes);
#pragma unroll
    for (int kk = 0; kk < kDims; kk += kK) {
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

    if (++chunk == chunks) {  // the code tile is complete: fold its keys
      __syncthreads();        // every warp is done reading this buffer's operands
      float* park = reinterpret_cast<float*>(stage_mem[buf]) + warp * 32 * kParkLd;
      const float* my_row = park + lane * kParkLd;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::store_matrix_sync(park, acc[0][j], kParkLd, wmma::mem_row_major);
        wmma::store_matrix_sync(park + 16 * kParkLd, acc[1][j], kParkLd, wmma::mem_row_major);
        __syncwarp();
        const int c0 = warp_code * 64 + j * 16;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 dot = *reinterpret_cast<const float4*>(my_row + 4 * q);
          const float4 a4 = *reinterpret_cast<const float4*>(&tile_alpha[tile_parity][c0 + 4 * q]);
          const float4 b4 = *reinterpret_cast<const float4*>(&tile_beta[tile_parity][c0 + 4 * q]);
          const float keys[4] = {fmaf(a4.x, dot.x, b4.x), fmaf(a4.y, dot.y, b4.y), fmaf(a4.z, dot.z, b4.z),
                                 fmaf(a4.w, dot.w, b4.w)};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            // Taken when key < best, or key is NaN while best is not (NaN keys win, the first one
            // stays): `best == best` is false only for a NaN best.
            if (!(keys[e] >= best_key) && best_key == best_key) {
              best_key = keys[e];
              best_index = code0 + c0 + 4 * q + e;
            }
          }
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::fill_fragment(acc[i][j], 0.0f);
      }
      chunk = 0;
      code0 += kTcCodes;
      tile_parity ^= 1;
    }
  }

  // The two warps along codes share each row.
  {
    const int r = warp_row * 32 + lane;
    pair_key[r][warp_code] = best_key;
    pair_index[r][warp_code] = best_index;
  }
  __syncthreads();
  for (int r = threadIdx.x; r < kTcRows; r += kTcThreads) {
    float key = pair_key[r][0];
    int64_t index = pair_index[r][0];
    fold(pair_key[r][1], pair_index[r][1], key, index);
    if (row0 + r < n) indices[row0 + r] = index;
  }
}

// Two blocks per SM: caps registers at 128 (the TF32 variant held 150 before its stage was halved).
template <typename T>
__global__ void __launch_bounds__(kTcThreads, 2)
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
