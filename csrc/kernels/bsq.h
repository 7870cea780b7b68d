// Binary spherical quantisation (Zhao, Xiong, Kraehenbuehl 2024, https://arxiv.org/abs/2406.07548).
//
// bsq_quantize, per row z[n, :] of z[N, d]:
//   u = z / max(||z||, eps)                       (eps = 1e-12, as F.normalize)
//   quantized[n, i] = (u_i > 0 ? +1 : -1) / sqrt(d)   (the value 1/sqrt(d) rounded once to fp32)
//   index[n] = sum_i [u_i > 0] 2^(d - 1 - i)      (channel 0 most significant, as LFQ)
//   straight-through: quantized = u + (q - u).detach(), so
//   bsq_quantize_backward: grad_z = (g - u <u, g>) / ||z||   (g / eps when ||z|| < eps)
//   A row holding NaN or Inf (whose projection F.normalize makes NaN): quantized NaN, index -1.
//
// bsq_entropy, the paper's factorised estimate (per-dim Bernoullis, logit a = 4 tau u / sqrt(d),
// tau = inv_temperature; the soft assignment of -||u - c||^2 / tau over c in {+-1/sqrt(d)}^d):
//   per_sample_entropy[n] = sum_i h(a[n, i])                   h: binary entropy (lfq.h)
//   avg_probs[i] = (1 / N) sum_n sigmoid(a[n, i])              [d]
//   The codebook-entropy estimate sum_i h(avg_probs[i]) is formed by the caller from avg_probs.
// bsq_entropy_backward: dL/da[n, i] = grad_per_sample[n] (-a p (1 - p)) + grad_avg_probs[i] p (1 - p) / N,
//   dL/du = 4 tau / sqrt(d) dL/da, then through the projection as bsq_quantize_backward.
//
// Layout: z, quantized, grads [N, d] contiguous; indices, per_sample [N]; avg_probs [d].
// Thread mapping: one row per iteration (CPU: OpenMP over rows; CUDA: one thread per row, grid
//   stride). avg_probs is summed in fixed chunks of rows (fp64 partials), then the chunks in order:
//   deterministic, independent of the thread count.
// Accumulation: fp32 for fp32/fp16/bf16 (fp64 for double, CPU only); partial sums of avg_probs fp64.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastlatent {

constexpr double kBsqEps = 1e-12;
constexpr int kBsqMaxDims = 62;       // int64 indices
constexpr int64_t kBsqChunkRows = 1024;  // rows per fixed-order partial sum of avg_probs

struct BsqParams {
  const void* z = nullptr;                // [n, d], dtype
  int64_t n = 0;
  int d = 0;                              // 1..kBsqMaxDims
  DType dtype = DType::kFloat32;
  // quantize
  void* quantized = nullptr;              // [n, d], dtype
  int64_t* indices = nullptr;             // [n]
  // quantize backward
  const void* grad_quantized = nullptr;   // [n, d], dtype
  void* grad_z = nullptr;                 // [n, d], dtype
  // entropy: outputs and their grads have element type float32 (float64 for double inputs)
  double logit_scale = 4.0;               // 4 * inv_temperature / sqrt(d)
  void* per_sample_entropy = nullptr;     // [n]
  void* avg_probs = nullptr;              // [d]
  const void* grad_per_sample = nullptr;  // [n]
  const void* grad_avg_probs = nullptr;   // [d]
  // CUDA only: bsq_entropy_cuda_workspace_bytes(n, d) bytes, 16-byte aligned.
  void* workspace = nullptr;
};

Status run_bsq_quantize_cpu(const BsqParams& params);
Status run_bsq_quantize_backward_cpu(const BsqParams& params);
Status run_bsq_entropy_cpu(const BsqParams& params);
Status run_bsq_entropy_backward_cpu(const BsqParams& params);

inline size_t bsq_entropy_cuda_workspace_bytes(int64_t n, int d) {
  return static_cast<size_t>((n + kBsqChunkRows - 1) / kBsqChunkRows) * d * sizeof(double);
}

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
cudaError_t launch_bsq_quantize_cuda(const BsqParams& params, cudaStream_t stream);
cudaError_t launch_bsq_quantize_backward_cuda(const BsqParams& params, cudaStream_t stream);
cudaError_t launch_bsq_entropy_cuda(const BsqParams& params, cudaStream_t stream);
cudaError_t launch_bsq_entropy_backward_cuda(const BsqParams& params, cudaStream_t stream);
#endif

}  // namespace fastlatent
