// CUDA code_stats (see code_stats.h).
//
// Deterministic path (default):
//   1. keys[i] = indices[i] if in [0, k) else k (sorted past every code), values[i] = i;
//   2. cub::DeviceRadixSort::SortPairs over the bits of k: a stable sort, so rows of one
//      code stay in increasing row order;
//   3. segment bounds by binary search in the sorted keys, one thread per code;
//   4. pieces: the sorted positions are cut at every multiple of kPieceRows (code_stats.h), so
//      a code's rows fall into pieces of at most kPieceRows rows; one block per piece sums its
//      rows in order, threads across d, in fp32. A code of one piece writes its sums directly;
//   5. a code of several pieces combines them in a pairwise tree (stride 1, 2, 4, ...), four
//      tree levels per launch (a warp per group of 16 pieces, in registers), the root writing
//      the code's sums. The order depends only on the sorted positions, never on timing: the
//      result is the same on every run and equals the CPU kernel's bit for bit. A collapsed
//      code of N rows no longer runs on one block (N sequential loads per thread), and its
//      rounding error grows like kPieceRows + log2(N / kPieceRows) instead of N.
// Piece slots: code c owns slots [f(c), f(c + 1)) with f(c) = starts[c] / kPieceRows + c, one
// per piece (plus a trailing empty one where a code ends on a piece boundary); f is increasing,
// so a slot finds its code by binary search and the grid is at most N / kPieceRows + k slots.
// Partial sums of multi-piece codes: piece j of a code starting in chunk m0 = begin / kPieceRows
// sits at partial row 2 m0 (j = 0) or 2 (m0 + j) + 1 (j > 0); only codes of two or more pieces
// store partials, and those rows are distinct across such codes (2 (N / kPieceRows + 1) rows).
// Atomic path (deterministic = false): sums and integer counters zeroed, then one thread per
// element adds into them with atomics (float for sums, 32-bit integer for counts: a float
// counter stops at 2^24, where adding 1 no longer changes it), then the counters are converted.
//
// Workspace layout (deterministic): keys_in, keys_out, rows_in, rows_out (int32, n each),
// starts (int32, k + 1), partials (fp32, 2 (n / kPieceRows + 1) x d), then cub's temporary
// storage; (atomic): the counters (uint32, k).
// n must be below 2^31, which also bounds every count.
#include <cub/device/device_radix_sort.cuh>

#include "code_stats.h"
#include "cuda_utils.cuh"

namespace fastlatent {
namespace {

constexpr int kThreads = 256;
constexpr int kFanIn = 16;        // pieces combined per group and launch: four pairwise tree levels
constexpr int kWarpsPerBlock = 8;  // combine: one warp per group

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

int key_bits(int64_t k) {
  int bits = 1;
  while ((int64_t{1} << bits) <= k) ++bits;  // keys go up to k inclusive
  return bits;
}

struct Workspace {
  int32_t* keys_in;
  int32_t* keys_out;
  int32_t* rows_in;
  int32_t* rows_out;
  int32_t* starts;
  float* partials;
  void* cub_storage;
  size_t cub_bytes;
};

size_t cub_sort_bytes(int64_t n, int64_t k) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<int>(n), 0, key_bits(k));
  return bytes;
}

size_t partial_bytes(int64_t n, int64_t d) {
  return align_up(static_cast<size_t>(2 * (n / kCodeStatsPieceRows + 1)) * static_cast<size_t>(d) * sizeof(float));
}

Workspace carve(void* base, int64_t n, int64_t k, int64_t d) {
  char* p = static_cast<char*>(base);
  Workspace w;
  const size_t column = align_up(static_cast<size_t>(n) * sizeof(int32_t));
  w.keys_in = reinterpret_cast<int32_t*>(p);
  w.keys_out = reinterpret_cast<int32_t*>(p + column);
  w.rows_in = reinterpret_cast<int32_t*>(p + 2 * column);
  w.rows_out = reinterpret_cast<int32_t*>(p + 3 * column);
  w.starts = reinterpret_cast<int32_t*>(p + 4 * column);
  char* const after_starts = p + 4 * column + align_up(static_cast<size_t>(k + 1) * sizeof(int32_t));
  w.partials = reinterpret_cast<float*>(after_starts);
  w.cub_storage = after_starts + partial_bytes(n, d);
  w.cub_bytes = cub_sort_bytes(n, k);
  return w;
}

__global__ void make_keys_kernel(const int64_t* __restrict__ indices, int64_t n, int64_t k,
                                 int32_t* __restrict__ keys, int32_t* __restrict__ rows) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = indices[i];
    keys[i] = (c >= 0 && c < k) ? static_cast<int32_t>(c) : static_cast<int32_t>(k);
    rows[i] = static_cast<int32_t>(i);
  }
}

// starts[c] = first position in sorted keys with key >= c, for c in [0, k].
__global__ void segment_starts_kernel(const int32_t* __restrict__ sorted_keys, int64_t n, int64_t k,
                                      int32_t* __restrict__ starts) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c > k) return;
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted_keys[mid] < c) lo = mid + 1;
    else hi = mid;
  }
  starts[c] = static_cast<int32_t>(lo);
}

// Code c's first piece slot (see the top of the file).
__device__ __forceinline__ int64_t first_slot(const int32_t* __restrict__ starts, int64_t c) {
  return starts[c] / kCodeStatsPieceRows + c;
}

// The code owning slot s: the largest c in [0, k) with first_slot(c) <= s (first_slot(0) = 0).
__device__ int64_t code_of_slot(const int32_t* __restrict__ starts, int64_t k, int64_t s) {
  int64_t lo = 0, hi = k - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (first_slot(starts, mid) <= s) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Step 4: one block per slot; threads across d, each summing its column over the piece's rows in order.
// 40 registers (6 blocks of 256 per SM): capping at 32 for full occupancy spills 128 B (sm_90).
template <typename T>
__global__ void segment_sums_kernel(const T* __restrict__ x, const int32_t* __restrict__ rows,
                                    const int32_t* __restrict__ starts, int64_t k, int64_t d, int64_t slots,
                                    float* __restrict__ counts, float* __restrict__ sums,
                                    float* __restrict__ partials) {
  for (int64_t s = blockIdx.x; s < slots; s += gridDim.x) {
    const int64_t c = code_of_slot(starts, k, s);
    const int64_t begin = starts[c], end = starts[c + 1];
    const int64_t j = s - first_slot(starts, c);
    const int64_t pieces = code_stats_piece_count(begin, end);
    if (j >= (pieces > 1 ? pieces : 1)) continue;  // a trailing empty slot (or past the last code's)
    const int64_t m = begin / kCodeStatsPieceRows + j;
    const int64_t lo = begin > m * kCodeStatsPieceRows ? begin : m * kCodeStatsPieceRows;
    const int64_t hi = end < (m + 1) * kCodeStatsPieceRows ? end : (m + 1) * kCodeStatsPieceRows;
    float* const out = pieces > 1 ? partials + code_stats_partial_row(begin, j) * d : sums + c * d;
    for (int64_t t = threadIdx.x; t < d; t += blockDim.x) {
      float sum = 0.0f;
      for (int64_t i = lo; i < hi; ++i) sum += cuda::to_float(x[static_cast<int64_t>(rows[i]) * d + t]);
      out[t] = sum;
    }
    if (threadIdx.x == 0 && j == 0) counts[c] = static_cast<float>(end - begin);
  }
}

// Step 5, tree levels 4l .. 4l + 3 (stride = kFanIn^l): the group of pieces j, j + stride, ...,
// j + 15 stride (those that exist) of a multi-piece code, j a multiple of kFanIn * stride, is
// combined pairwise in registers, exactly as four levels of the stride-doubling tree would; the
// group holding every piece of its code (the root) writes the code's sums.
__global__ void segment_combine_kernel(const int32_t* __restrict__ starts, int64_t k, int64_t d, int64_t slots,
                                       int64_t stride, float* __restrict__ partials, float* __restrict__ sums) {
  const int lane = threadIdx.x % 32;
  for (int64_t s = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32; s < slots;
       s += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t c = code_of_slot(starts, k, s);
    const int64_t begin = starts[c], end = starts[c + 1];
    const int64_t j = s - first_slot(starts, c);
    const int64_t pieces = code_stats_piece_count(begin, end);
    // single pieces wrote their sums; codes of at most `stride` pieces finished at an earlier level
    if (pieces <= stride || j >= pieces || j % (kFanIn * stride) != 0) continue;
    const int64_t left = (pieces - j + stride - 1) / stride;  // children from j on, >= 2
    const int64_t present = left < kFanIn ? left : kFanIn;
    const bool root = j == 0 && pieces <= kFanIn * stride;
    float* const out = root ? sums + c * d : partials + code_stats_partial_row(begin, j) * d;
    for (int64_t t = lane; t < d; t += 32) {
      float v[kFanIn];
#pragma unroll
      for (int q = 0; q < kFanIn; ++q)
        v[q] = q < present ? partials[code_stats_partial_row(begin, j + q * stride) * d + t] : 0.0f;
#pragma unroll
      for (int w = 1; w < kFanIn; w *= 2) {
#pragma unroll
        for (int q = 0; q + w < kFanIn; q += 2 * w)
          if (q + w < present) v[q] += v[q + w];
      }
      out[t] = v[0];
    }
  }
}

template <typename T>
__global__ void atomic_stats_kernel(const T* __restrict__ x, const int64_t* __restrict__ indices,
                                    int64_t n, int64_t k, int64_t d, unsigned int* __restrict__ counters,
                                    float* __restrict__ sums) {
  const int64_t total = n * d;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / d, t = e - row * d;
    const int64_t c = indices[row];
    if (c < 0 || c >= k) continue;
    atomicAdd(sums + c * d + t, cuda::to_float(x[e]));
    if (t == 0) atomicAdd(counters + c, 1u);
  }
}

__global__ void counters_to_counts_kernel(const unsigned int* __restrict__ counters, int64_t k,
                                          float* __restrict__ counts) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c < k) counts[c] = static_cast<float>(counters[c]);  // rounded once, as the sorted path
}

unsigned int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

template <typename T>
cudaError_t launch_typed(const CodeStatsParams& p, cudaStream_t stream) {
  const T* x = static_cast<const T*>(p.x);
  if (!p.deterministic) {
    auto* counters = static_cast<unsigned int*>(p.workspace);
    cudaError_t err = cudaMemsetAsync(counters, 0, p.k * sizeof(unsigned int), stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(p.sums, 0, p.k * p.d * sizeof(float), stream);
    if (err != cudaSuccess) return err;
    if (p.n > 0) {
      atomic_stats_kernel<T><<<grid_for(p.n * p.d), kThreads, 0, stream>>>(x, p.indices, p.n, p.k, p.d,
                                                                          counters, p.sums);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    counters_to_counts_kernel<<<cuda::ceil_div(p.k, kThreads), kThreads, 0, stream>>>(counters, p.k, p.counts);
    return cudaGetLastError();
  }
  Workspace w = carve(p.workspace, p.n, p.k, p.d);
  if (p.n > 0) {
    make_keys_kernel<<<grid_for(p.n), kThreads, 0, stream>>>(p.indices, p.n, p.k, w.keys_in, w.rows_in);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    err = cub::DeviceRadixSort::SortPairs(w.cub_storage, w.cub_bytes, w.keys_in, w.keys_out, w.rows_in,
                                          w.rows_out, static_cast<int>(p.n), 0, key_bits(p.k), stream);
    if (err != cudaSuccess) return err;
  }
  segment_starts_kernel<<<cuda::ceil_div(p.k + 1, kThreads), kThreads, 0, stream>>>(w.keys_out, p.n, p.k,
                                                                                     w.starts);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int threads = p.d >= 256 ? 256 : p.d >= 128 ? 128 : p.d >= 64 ? 64 : 32;
  const int64_t slots = p.n / kCodeStatsPieceRows + p.k;  // >= first_slot(k): every piece has its slot
  const auto blocks = [](int64_t work) {
    return static_cast<unsigned int>(work < 65535 * 8 ? (work > 0 ? work : 1) : 65535 * 8);
  };
  segment_sums_kernel<T><<<blocks(slots), threads, 0, stream>>>(x, w.rows_out, w.starts, p.k, p.d, slots,
                                                                p.counts, p.sums, w.partials);
  err = cudaGetLastError();
  // a code has at most (n - 1) / kPieceRows + 1 pieces: combine until one group holds them all
  const int64_t max_pieces = p.n > 0 ? (p.n - 1) / kCodeStatsPieceRows + 1 : 0;
  for (int64_t stride = 1; err == cudaSuccess && stride < max_pieces; stride *= kFanIn) {
    segment_combine_kernel<<<blocks(cuda::ceil_div(slots, kWarpsPerBlock)), kWarpsPerBlock * 32, 0, stream>>>(
        w.starts, p.k, p.d, slots, stride, w.partials, p.sums);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

size_t code_stats_cuda_workspace_bytes(int64_t n, int64_t k, int64_t d, bool deterministic) {
  if (!deterministic) return static_cast<size_t>(k) * sizeof(unsigned int);
  return 4 * align_up(static_cast<size_t>(n) * sizeof(int32_t)) +
         align_up(static_cast<size_t>(k + 1) * sizeof(int32_t)) + partial_bytes(n, d) + cub_sort_bytes(n, k);
}

cudaError_t launch_code_stats_cuda(const CodeStatsParams& params, cudaStream_t stream) {
  if (params.k < 1 || params.d < 1 || params.n < 0 || params.n >= (int64_t{1} << 31))
    return cudaErrorInvalidValue;
  if (params.workspace == nullptr) return cudaErrorInvalidValue;
  return FL_CUDA_DTYPE_SWITCH(params.dtype, scalar_t, cudaErrorInvalidValue,
                              [&] { return launch_typed<scalar_t>(params, stream); });
}

}  // namespace fastlatent
