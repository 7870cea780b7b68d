// CUDA code_stats (see code_stats.h).
//
// Deterministic path (default):
//   1. keys[i] = indices[i] if in [0, k) else k (sorted past every code), values[i] = i;
//   2. cub::DeviceRadixSort::SortPairs over the bits of k: a stable sort, so rows of one
//      code stay in increasing row order;
//   3. segment bounds by binary search in the sorted keys, one thread per code;
//   4. one block per code sums its rows in order, threads across d, in fp32.
// Atomic path (deterministic = false): sums and integer counters zeroed, then one thread per
// element adds into them with atomics (float for sums, 32-bit integer for counts: a float
// counter stops at 2^24, where adding 1 no longer changes it), then the counters are converted.
//
// Workspace layout (deterministic): keys_in, keys_out, rows_in, rows_out (int32, n each),
// starts (int32, k + 1), then cub's temporary storage; (atomic): the counters (uint32, k).
// n must be below 2^31, which also bounds every count.
#include <cub/device/device_radix_sort.cuh>

#include "code_stats.h"
#include "cuda_utils.cuh"

namespace fastlatent {
namespace {

constexpr int kThreads = 256;

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

Workspace carve(void* base, int64_t n, int64_t k) {
  char* p = static_cast<char*>(base);
  Workspace w;
  const size_t column = align_up(static_cast<size_t>(n) * sizeof(int32_t));
  w.keys_in = reinterpret_cast<int32_t*>(p);
  w.keys_out = reinterpret_cast<int32_t*>(p + column);
  w.rows_in = reinterpret_cast<int32_t*>(p + 2 * column);
  w.rows_out = reinterpret_cast<int32_t*>(p + 3 * column);
  w.starts = reinterpret_cast<int32_t*>(p + 4 * column);
  w.cub_storage = p + 4 * column + align_up(static_cast<size_t>(k + 1) * sizeof(int32_t));
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

template <typename T>
__global__ void segment_sums_kernel(const T* __restrict__ x, const int32_t* __restrict__ rows,
                                    const int32_t* __restrict__ starts, int64_t d,
                                    float* __restrict__ counts, float* __restrict__ sums) {
  const int64_t c = blockIdx.x;
  const int32_t begin = starts[c], end = starts[c + 1];
  for (int64_t t = threadIdx.x; t < d; t += blockDim.x) {
    float sum = 0.0f;
    for (int32_t i = begin; i < end; ++i) sum += cuda::to_float(x[static_cast<int64_t>(rows[i]) * d + t]);
    sums[c * d + t] = sum;
  }
  if (threadIdx.x == 0) counts[c] = static_cast<float>(end - begin);
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
  Workspace w = carve(p.workspace, p.n, p.k);
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
  segment_sums_kernel<T><<<static_cast<unsigned int>(p.k), threads, 0, stream>>>(x, w.rows_out, w.starts, p.d,
                                                                                 p.counts, p.sums);
  return cudaGetLastError();
}

}  // namespace

size_t code_stats_cuda_workspace_bytes(int64_t n, int64_t k, bool deterministic) {
  if (!deterministic) return static_cast<size_t>(k) * sizeof(unsigned int);
  return 4 * align_up(static_cast<size_t>(n) * sizeof(int32_t)) +
         align_up(static_cast<size_t>(k + 1) * sizeof(int32_t)) + cub_sort_bytes(n, k);
}

cudaError_t launch_code_stats_cuda(const CodeStatsParams& params, cudaStream_t stream) {
  if (params.k < 1 || params.d < 1 || params.n < 0 || params.n >= (int64_t{1} << 31))
    return cudaErrorInvalidValue;
  if (params.workspace == nullptr) return cudaErrorInvalidValue;
  return FL_CUDA_DTYPE_SWITCH(params.dtype, scalar_t, cudaErrorInvalidValue,
                              [&] { return launch_typed<scalar_t>(params, stream); });
}

}  // namespace fastlatent
