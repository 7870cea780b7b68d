// Small device helpers shared by fastlatent's CUDA kernels (torch-free).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dispatch.h"

namespace fastlatent {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

inline unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

}  // namespace cuda
}  // namespace fastlatent

// CUDA flavour of the dtype switch: fp32, fp16, bf16 as CUDA's own types.
#define FL_CUDA_DTYPE_SWITCH(DTYPE, NAME, UNSUPPORTED, ...) \
  FL_DTYPE_SWITCH_T(DTYPE, NAME, float, __half, __nv_bfloat16, UNSUPPORTED, __VA_ARGS__)
