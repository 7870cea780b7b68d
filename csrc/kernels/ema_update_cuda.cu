// CUDA ema_update_ (see ema_update.h).
//   1. one block updates cluster_size and sums it in double (each thread a fixed strided
//      subset, then a fixed tree): deterministic; the total goes to the workspace.
//   2. embed_kernel over k x d updates embed_sum and writes the codebook (a block per contiguous
//      range of elements, 1 / smoothed size once per code and block).
#include <algorithm>

#include "cuda_utils.cuh"
#include "ema_update.h"
#include "fast_divmod.cuh"

namespace fastlatent {
namespace {

constexpr int kSizeThreads = 1024;
constexpr int kThreads = 256;

using cuda::FastDivmod;

__global__ void __launch_bounds__(kSizeThreads)
cluster_size_kernel(float* __restrict__ cluster_size, const float* __restrict__ counts, int64_t k,
                    float decay, double* __restrict__ total) {
  __shared__ double partial[kSizeThreads];
  double sum = 0.0;
  for (int64_t c = threadIdx.x; c < k; c += kSizeThreads) {
    const float value = decay * cluster_size[c] + (1.0f - decay) * counts[c];
    cluster_size[c] = value;
    sum += value;
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kSizeThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *total = partial[0];
}

// Elements per block of embed_kernel: a block owns kSpan contiguous elements of the k x d arrays.
constexpr int kSpan = kThreads * 8;
constexpr int64_t kMaxLaunchElements = (int64_t{1} << 31) - 1;

// Block b owns the elements [b * kSpan, ...) of its launch, which cover the codes row0 .. row1. Its
// threads first compute 1 / smoothed_size per code into shared memory (the fp64 division once per code
// and block instead of once per element; at most kSpan codes, d = 1), then stream the elements
// (thread t takes t, t + kThreads, ...: coalesced), finding each element's code by a multiply-high
// division (per_row: d). Indices are 32-bit: the launcher keeps each launch below 2^31 elements. The
// arithmetic is the per-element formula's, so the results are unchanged.
template <typename T>
__global__ void __launch_bounds__(kThreads)
embed_kernel(float* __restrict__ embed_sum, T* __restrict__ codebook, const float* __restrict__ sums,
             const float* __restrict__ cluster_size, const double* __restrict__ total_ptr, uint32_t elements,
             FastDivmod per_row, int64_t k, float decay, float eps) {
  __shared__ float inverse[kSpan];
  const uint32_t first = blockIdx.x * kSpan;
  const uint32_t last = min(elements, first + kSpan);
  const uint32_t row0 = per_row.div(first), rows = per_row.div(last - 1) - row0 + 1;
  const double total = *total_ptr;
  const double denominator = total + static_cast<double>(k) * eps;
  for (uint32_t r = threadIdx.x; r < rows; r += kThreads) {
    const float smoothed = static_cast<float>((cluster_size[row0 + r] + eps) / denominator * total);
    inverse[r] = 1.0f / smoothed;
  }
  __syncthreads();
  for (uint32_t e = first + threadIdx.x; e < last; e += kThreads) {
    const float value = decay * embed_sum[e] + (1.0f - decay) * sums[e];
    embed_sum[e] = value;
    codebook[e] = cuda::from_float<T>(value * inverse[per_row.div(e) - row0]);
  }
}

// embed_kernel over launches of whole codes below 2^31 elements (pointer offsets stay 64-bit here). A
// single code of 2^31 elements or more (d >= 2^31) is refused.
template <typename T>
cudaError_t launch_typed(const EmaUpdateParams& p, cudaStream_t stream) {
  if (p.d > kMaxLaunchElements) return cudaErrorInvalidValue;
  double* total = static_cast<double*>(p.workspace);
  cluster_size_kernel<<<1, kSizeThreads, 0, stream>>>(p.cluster_size, p.counts, p.k, p.decay, total);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t rows_per_launch = kMaxLaunchElements / p.d;
  const FastDivmod per_row = FastDivmod::make(static_cast<uint32_t>(p.d));
  T* codebook = static_cast<T*>(p.codebook);
  for (int64_t r0 = 0; r0 < p.k; r0 += rows_per_launch) {
    const int64_t e0 = r0 * p.d;
    const uint32_t elements = static_cast<uint32_t>(std::min(rows_per_launch, p.k - r0) * p.d);
    const unsigned int blocks = (elements + kSpan - 1) / kSpan;
    embed_kernel<T><<<blocks, kThreads, 0, stream>>>(p.embed_sum + e0, codebook + e0, p.sums + e0,
                                                     p.cluster_size + r0, total, elements, per_row, p.k,
                                                     p.decay, p.eps);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_ema_update_cuda(const EmaUpdateParams& params, cudaStream_t stream) {
  if (params.k < 1 || params.d < 1 || params.workspace == nullptr) return cudaErrorInvalidValue;
  return FL_CUDA_DTYPE_SWITCH(params.codebook_dtype, scalar_t, cudaErrorInvalidValue,
                              [&] { return launch_typed<scalar_t>(params, stream); });
}

}  // namespace fastlatent
