// Lookup-free quantisation (MAGVIT-v2, https://arxiv.org/abs/2310.05737) and its entropy loss,
// as vector-quantize-pytorch's LFQ computes them, without the N x 2^d soft assignments.
//
// lfq_quantize, per row x[n, :] of x[N, d]:
//   quantized[n, i] = x[n, i] > 0 ? +s : -s                    (s = codebook_scale)
//   index[n] = sum_i [x[n, i] > 0] 2^(d - 1 - i)               (channel 0 is the most
//                                                               significant bit, as vqp)
//   NaN element: quantized NaN, index -1 for its row. +-Inf are signs like any number.
//   The straight-through gradient is the identity (no kernel needed).
//
// lfq_entropy: the per-sample softmax over the 2^d codes c in {-s, +s}^d of -||x - c||^2 / tau
//   (logits 2 <x, c> / tau, tau = 1 / inv_temperature) factorises into independent Bernoullis:
//     a[n, i] = 4 s x[n, i] / tau,  P_n(c) = prod_i q[n, i](c_i),  q(+) = sigmoid(a), q(-) = sigmoid(-a)
//   outputs:
//     per_sample_entropy[n] = H(P_n) = sum_i h(a[n, i]),  h(a) = log(1 + e^-|a|) + |a| sigmoid(-|a|)
//     avg_probs[c] = (1 / N) sum_n P_n(c)                    (2^d, c indexed like the indices)
//   The batch ("codebook") entropy H(avg_probs) is a 2^d elementwise op done by the caller, so any
//   function of avg_probs can be trained through lfq_entropy_backward.
//   avg_probs: the d bits are split into high (U = d - d/2 bits) and low (L = d/2 bits) halves:
//   P_n(u, l) = wU_n(u) wL_n(l), where wU_n, wL_n (2^U, 2^L entries) come from subset-product
//   expansions (2^(m+1) multiplies for m bits). avg_probs is then WU^T WL / N, a rank-N sum of
//   outer products accumulated in blocks of samples: O(N 2^d) FMAs, O(2^d) memory.
// lfq_entropy_backward(grad_per_sample[N], grad_avg_probs G[2^d]):
//   dL/da[n, i] = grad_per_sample[n] (-a p (1 - p))
//               + (1 / N) p (1 - p) sum_c G(c) sign_i(c) prod_{j != i} q[n, j](c_j)
//   For i in the high half the sum is sum_u sign_i(u) prod_{j in U, j != i} q_j(u_j) hU_n(u) with
//   hU_n = G wL_n (a 2^U x 2^L matrix-vector product; for the low half hL_n = G^T wU_n), so the
//   backward is two GEMM-shaped products plus O(d 2^(d/2)) per sample. dL/dx = 4 s / tau dL/da.
//
// NaN: a NaN element makes that sample's entropy NaN and every avg_probs entry NaN.
// +-Inf: p in {0, 1}, entropy 0, gradient 0. N = 0: avg_probs is NaN (the mean of no samples,
// as torch.mean).
//
// Layout: x, grad_x [N, d] contiguous; per_sample [N]; avg_probs, G [2^d] contiguous.
// Thread mapping: CPU: avg_probs is split by rows u of the 2^U x 2^L matrix, each thread owns a
//   range of u and walks all samples in order (so no reduction: the result does not depend on
//   the thread count); per-sample work and the backward split samples statically. CUDA: see
//   lfq_cuda.cu (tiles of avg_probs x fixed sample splits, then a fixed-order split reduction).
// Accumulation: products and block sums in fp32 (fp64 for double inputs), avg_probs accumulated
//   in fp64 across sample blocks. Deterministic on both devices.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastlatent {

constexpr int kLfqMaxQuantizeDims = 62;  // int64 indices
constexpr int kLfqMaxEntropyDims = 18;   // 2^18 avg_probs entries (MAGVIT-v2's codebook)

struct LfqQuantizeParams {
  const void* x = nullptr;      // [n, d], dtype
  void* quantized = nullptr;    // [n, d], dtype
  int64_t* indices = nullptr;   // [n]
  int64_t n = 0;
  int d = 0;                    // 1..kLfqMaxQuantizeDims
  double codebook_scale = 1.0;
  DType dtype = DType::kFloat32;
};

struct LfqEntropyParams {
  const void* x = nullptr;               // [n, d], dtype
  int64_t n = 0;
  int d = 0;                             // 1..kLfqMaxEntropyDims
  double logit_scale = 4.0;              // 4 * codebook_scale * inv_temperature
  DType dtype = DType::kFloat32;
  // forward outputs, element type `out_dtype` (float32, or float64 for double inputs)
  void* per_sample_entropy = nullptr;    // [n]
  void* avg_probs = nullptr;             // [2^d]
  // backward
  const void* grad_per_sample = nullptr; // [n], out_dtype
  const void* grad_avg_probs = nullptr;  // [2^d], out_dtype
  void* grad_x = nullptr;                // [n, d], dtype
  // CUDA only: scratch of lfq_entropy_cuda_workspace_bytes() bytes, 16-byte aligned.
  void* workspace = nullptr;
};

Status run_lfq_quantize_cpu(const LfqQuantizeParams& params);
Status run_lfq_entropy_cpu(const LfqEntropyParams& params);
Status run_lfq_entropy_backward_cpu(const LfqEntropyParams& params);

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
cudaError_t launch_lfq_quantize_cuda(const LfqQuantizeParams& params, cudaStream_t stream);
// Workspace of the forward (fixed-order partial sums) and the backward (G transposed).
size_t lfq_entropy_cuda_workspace_bytes(int64_t n, int d, bool backward);
cudaError_t launch_lfq_entropy_cuda(const LfqEntropyParams& params, cudaStream_t stream);
cudaError_t launch_lfq_entropy_backward_cuda(const LfqEntropyParams& params, cudaStream_t stream);
#endif

}  // namespace fastlatent
