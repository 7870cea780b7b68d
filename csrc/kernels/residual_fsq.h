// Residual FSQ (Algorithm 1 of https://arxiv.org/abs/2107.03312 over symmetric, hard-clamped FSQ
// layers; vector-quantize-pytorch's ResidualFSQ with bound_hard_clamp=True), every layer in one pass.
//
// Math, per element z of channel c with L = levels[c] and per-layer scales s_l = scales[l, c]:
//   r_0 = z
//   for l = 0 .. Q-1:
//     b = r_l / s_l                          (the layer's input, vqp's `residual / scale`)
//     pass_count += (|b| <= 1)               (the hard clamp passes the gradient on [-1, 1])
//     k = floor(((clamp(b, -1, 1) + 1) * ((L - 1) / 2)) + 0.5)  in [0, L)
//     q_l = ((k * (2 / (L - 1))) - 1) * s_l  (2 / (L - 1) rounded to fp32, as vqp's float buffer)
//     z_hat += q_l;  r_{l+1} = r_l - q_l
//     index_l = sum_c k_c * basis_c, basis_c = prod_{j < c} L_j (channel 0 least significant)
//   d z_hat / d z = pass_count (straight-through: each layer's clamp, the residual is detached).
// Every step is one IEEE operation in the order above with no FMA contraction (the CPU file turns
// contraction off, the CUDA kernel uses the _rn intrinsics), so z_hat and the indices equal
// vector-quantize-pytorch's chain of torch ops bit for bit in fp32 and fp64, and CPU equals CUDA.
// Multiplying by (L - 1) / 2 equals vqp's multiply by L - 1 then halve: halving is exact.
//
// NaN: a NaN anywhere in a row makes that row's z_hat all NaN and its indices -1 (the residual
// carries the NaN through every layer). The math runs in fp32 for fp32/fp16/bf16 storage and in
// fp64 for double (CPU only); z_hat is rounded once to the storage dtype.
//
// Layout: z, z_hat, pass_count [rows, d] contiguous; scales [Q, d] in the math dtype; indices
// [rows, Q] int64. Thread mapping: CPU: OpenMP over chunks of rows, the layer loop over a chunk's
// flat elements (per-channel constants tiled to the chunk so it vectorises), then the chunk's
// indices per row. CUDA: one thread per element, a block holding whole rows; per layer each thread
// writes its level to shared memory and one thread per row forms that row's index. Deterministic.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"
#include "fsq.h"

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastlatent {

// pass_count is uint8: at most 255 layers (a scale of L^-255 is far below any float anyway).
constexpr int kResidualFsqMaxLayers = 255;

struct ResidualFsqParams {
  int64_t rows = 0;                  // product of the leading dims
  int d = 0;                         // channels, 1..kFsqMaxDims
  int num_quantizers = 0;            // Q, 1..kResidualFsqMaxLayers
  DType dtype = DType::kFloat32;     // storage of z and z_hat
  int64_t levels[kFsqMaxDims] = {};  // L per channel (>= 2, product <= 2^31)
  int64_t basis[kFsqMaxDims] = {};   // prod of the levels before the channel
  float step_f[kFsqMaxDims] = {};    // fp32(2 / (L - 1)), vqp's code step
  float half_f[kFsqMaxDims] = {};    // float32(L - 1) / 2 (exact halving)
};

// Fills levels, basis, step and half from levels (already validated). Inline: the CUDA emulator's build
// links the bindings without the CPU kernels.
inline void residual_fsq_make_constants(const int64_t* levels, int d, int num_quantizers,
                                        ResidualFsqParams& p) {
  p.d = d;
  p.num_quantizers = num_quantizers;
  int64_t basis = 1;
  for (int c = 0; c < d; ++c) {
    const int64_t L = levels[c];
    p.levels[c] = L;
    p.basis[c] = basis;
    basis *= L;
    // vqp: `2. / (levels - 1)` on an int tensor is a float32 division of float32(L - 1)
    const float lm1 = static_cast<float>(L - 1);
    p.step_f[c] = 2.0f / lm1;
    p.half_f[c] = lm1 * 0.5f;  // exact halving; equals float32((L - 1) / 2)
  }
}

struct ResidualFsqArgs {
  const void* z = nullptr;        // [rows, d], dtype
  const void* scales = nullptr;   // [Q, d], float (double when dtype is kFloat64)
  void* z_hat = nullptr;          // [rows, d], dtype
  int64_t* indices = nullptr;     // [rows, Q]
  uint8_t* pass_count = nullptr;  // [rows, d]
};

Status run_residual_fsq_cpu(const ResidualFsqParams& params, const ResidualFsqArgs& args);

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
cudaError_t launch_residual_fsq_cuda(const ResidualFsqParams& params, const ResidualFsqArgs& args,
                                     cudaStream_t stream);
#endif

}  // namespace fastlatent
