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

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Stable Bernoulli quantities of a logit a (the CPU twin is cpu_math::bernoulli): q(+), q(-),
// p (1 - p), binary entropy h (nats) and dh/da = -a p (1 - p), from e = exp(-|a|).
struct Bernoulli {
  float qpos, qneg, var, entropy, dentropy;
};

__device__ __forceinline__ Bernoulli bernoulli(float a) {
  const float aa = fabsf(a);
  const float e = expf(-aa);
  const float big = 1.0f / (1.0f + e);
  const float small = e * big;
  Bernoulli b;
  b.qpos = a >= 0.0f ? big : small;
  b.qneg = a >= 0.0f ? small : big;
  b.var = small * big;
  b.entropy = e == 0.0f ? 0.0f : log1pf(e) + aa * small;
  b.dentropy = e == 0.0f ? 0.0f : -a * b.var;
  return b;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

inline unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

// Blocks for a grid-stride loop over `work_items` blocks' worth of work: enough to fill the
// device `per_sm` times over, never more than there is work.
inline unsigned int grid_blocks(int64_t work_items, int per_sm = 16) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess)
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t cap = static_cast<int64_t>(sms) * per_sm;
  const int64_t blocks = work_items < cap ? work_items : cap;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

// cp.async (sm_80+): 16 bytes global -> shared without a register round trip; the copies of a thread
// land in groups (commit), and wait<N> returns once at most N of its newest groups are still in
// flight. Inline PTX on the GPU; under FL_EMULATION the emulator's model (copies land at the wait,
// reads of a destination before it are reported).
#ifdef FL_EMULATION
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) { fl_emu::cp_async(smem, gmem, 16); }
__device__ __forceinline__ void cp_async_commit() { fl_emu::cp_async_commit(); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  fl_emu::cp_async_wait(kPending);
}
#else
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}
#endif

// True when every pointer is 16-byte aligned (for uint4 loads and stores).
template <typename... P>
inline bool aligned16(const P*... ptrs) {
  return ((reinterpret_cast<uintptr_t>(ptrs) % 16 == 0) && ...);
}

}  // namespace cuda
}  // namespace fastlatent

// CUDA flavour of the dtype switch: fp32, fp16, bf16 as CUDA's own types.
#define FL_CUDA_DTYPE_SWITCH(DTYPE, NAME, UNSUPPORTED, ...) \
  FL_DTYPE_SWITCH_T(DTYPE, NAME, float, __half, __nv_bfloat16, UNSUPPORTED, __VA_ARGS__)
