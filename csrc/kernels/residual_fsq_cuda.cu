// CUDA residual FSQ: every layer in one pass. See residual_fsq.h for the math and NaN rules.
//
// A block of 256 threads owns floor(256 / d) whole rows, one thread per element: the thread keeps
// its element's residual, sum and pass count in registers through all layers. Per layer it writes
// its level to shared memory (two buffers, alternating by layer, so one barrier per layer
// suffices) and thread r of the block forms the int64 index of the block's row r. Grid-stride over
// row tiles, 64-bit offsets. Every multiply, add and divide is an _rn intrinsic: nvcc contracts
// a * b + c into an FMA by default, which would round differently from the CPU kernel and from
// vector-quantize-pytorch's chain of torch ops.
#include "cuda_utils.cuh"
#include "residual_fsq.h"

#if defined(FL_EMULATION) && defined(__GNUC__) && !defined(__clang__)
// the emulator's _rn functions are plain host arithmetic: keep gcc from contracting them
#pragma GCC optimize("fp-contract=off")
#endif

namespace fastlatent {
namespace {

constexpr int kThreads = 256;

struct SharedConstants {
  long long basis[kFsqMaxDims];
  float step[kFsqMaxDims], half[kFsqMaxDims];
};

// Compile-time indices into the parameter struct (a runtime index would spill it to local memory).
__device__ __forceinline__ void load_constants(const ResidualFsqParams& p, SharedConstants& s) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < kFsqMaxDims; ++i) {
      if (i < p.d) {
        s.basis[i] = p.basis[i];
        s.step[i] = p.step_f[i];
        s.half[i] = p.half_f[i];
      }
    }
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
residual_fsq_kernel(const ResidualFsqParams p, const T* __restrict__ z, const float* __restrict__ scales,
                    T* __restrict__ z_hat, int64_t* __restrict__ indices, uint8_t* __restrict__ pass_count) {
  __shared__ SharedConstants s;
  __shared__ int level[2][kThreads];
  __shared__ int row_nan[kThreads];
  load_constants(p, s);
  const int d = p.d;
  const int num_q = p.num_quantizers;
  const int tid = threadIdx.x;
  const int rows_per_tile = kThreads / d;
  const int row = tid / d;  // row inside the tile
  const int c = tid - row * d;
  const int64_t num_tiles = (p.rows + rows_per_tile - 1) / rows_per_tile;
  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    const int64_t row0 = t * rows_per_tile;
    const int rows = static_cast<int>(p.rows - row0 < rows_per_tile ? p.rows - row0 : rows_per_tile);
    const bool mine = row < rows;  // false also for the d * rows_per_tile .. 255 spare threads
    const int64_t e = (row0 + row) * d + c;
    float residual = mine ? cuda::to_float(z[e]) : 0.0f;
    float sum = 0.0f;
    int count = 0;
    if (tid < rows_per_tile) row_nan[tid] = 0;
    for (int l = 0; l < num_q; ++l) {
      const float scale = mine ? __ldg(scales + l * d + c) : 1.0f;
      const float b = __fdiv_rn(residual, scale);
      count += fabsf(b) <= 1.0f;
      float clamped = b > -1.0f ? b : -1.0f;  // NaN -> -1: the residual keeps the NaN
      clamped = clamped < 1.0f ? clamped : 1.0f;
      float y = __fadd_rn(__fmul_rn(__fadd_rn(clamped, 1.0f), s.half[c]), 0.5f);
      y = fminf(y, 2147483520.0f);  // below 2^31 (reached only when L > 2^24)
      const int k = static_cast<int>(y);  // y >= 0.5: truncation is floor
      const float q = __fmul_rn(__fsub_rn(__fmul_rn(static_cast<float>(k), s.step[c]), 1.0f), scale);
      sum = l == 0 ? q : __fadd_rn(sum, q);
      residual = __fsub_rn(residual, q);
      level[l & 1][tid] = k;
      __syncthreads();
      if (tid < rows) {
        long long index = 0;
        for (int i = 0; i < d; ++i) index += static_cast<long long>(level[l & 1][tid * d + i]) * s.basis[i];
        indices[(row0 + tid) * num_q + l] = index;
      }
    }
    if (mine && isnan(residual)) row_nan[row] = 1;
    __syncthreads();
    if (mine) {
      z_hat[e] = row_nan[row] ? cuda::from_float<T>(__int_as_float(0x7fc00000)) : cuda::from_float<T>(sum);
      pass_count[e] = static_cast<uint8_t>(count);
    }
    if (tid < rows && row_nan[tid]) {
      for (int l = 0; l < num_q; ++l) indices[(row0 + tid) * num_q + l] = -1;
    }
    __syncthreads();  // the next tile resets row_nan and rewrites level
  }
}

}  // namespace

cudaError_t launch_residual_fsq_cuda(const ResidualFsqParams& p, const ResidualFsqArgs& args,
                                     cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.d < 1 || p.d > kFsqMaxDims || p.num_quantizers < 1 || p.num_quantizers > kResidualFsqMaxLayers)
    return cudaErrorInvalidValue;
  const int rows_per_tile = kThreads / p.d;
  const unsigned int blocks = cuda::grid_blocks(cuda::ceil_div(p.rows, rows_per_tile), 8);
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    residual_fsq_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        p, static_cast<const scalar_t*>(args.z), static_cast<const float*>(args.scales),
        static_cast<scalar_t*>(args.z_hat), args.indices, args.pass_count);
    return cudaGetLastError();
  });
}

}  // namespace fastlatent
