// CUDA ema_update_ (see ema_update.h).
//   1. one block updates cluster_size and sums it in double (each thread a fixed strided
//      subset, then a fixed tree): deterministic; the total goes to the workspace.
//   2. a grid-stride pass over k x d updates embed_sum and writes the codebook.
#include "cuda_utils.cuh"
#include "ema_update.h"

namespace fastlatent {
namespace {

constexpr int kSizeThreads = 1024;
constexpr int kThreads = 256;

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

template <typename T>
__global__ void embed_kernel(float* __restrict__ embed_sum, T* __restrict__ codebook,
                             const float* __restrict__ sums, const float* __restrict__ cluster_size,
                             const double* __restrict__ total_ptr, int64_t k, int64_t d, float decay,
                             float eps) {
  const double total = *total_ptr;
  const double denominator = total + static_cast<double>(k) * eps;
  const int64_t elements = k * d;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < elements;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e / d;
    const float smoothed = static_cast<float>((cluster_size[c] + eps) / denominator * total);
    const float value = decay * embed_sum[e] + (1.0f - decay) * sums[e];
    embed_sum[e] = value;
    codebook[e] = cuda::from_float<T>(value * (1.0f / smoothed));
  }
}

template <typename T>
cudaError_t launch_typed(const EmaUpdateParams& p, cudaStream_t stream) {
  double* total = static_cast<double*>(p.workspace);
  cluster_size_kernel<<<1, kSizeThreads, 0, stream>>>(p.cluster_size, p.counts, p.k, p.decay, total);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t blocks = (p.k * p.d + kThreads - 1) / kThreads;
  const unsigned int grid = static_cast<unsigned int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  embed_kernel<T><<<grid, kThreads, 0, stream>>>(p.embed_sum, static_cast<T*>(p.codebook), p.sums,
                                                 p.cluster_size, total, p.k, p.d, p.decay, p.eps);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_ema_update_cuda(const EmaUpdateParams& params, cudaStream_t stream) {
  if (params.k < 1 || params.d < 1 || params.workspace == nullptr) return cudaErrorInvalidValue;
  return FL_CUDA_DTYPE_SWITCH(params.codebook_dtype, scalar_t, cudaErrorInvalidValue,
                              [&] { return launch_typed<scalar_t>(params, stream); });
}

}  // namespace fastlatent
