// group_norm: GroupNorm with the affine, an activation and a residual add fused in.
//
//   x: [n, c, s] (channels-first: NCHW and its 1D/3D kin, s = product of spatial dims) or
//      [n, s, c] in memory (channels-last). groups g divides c; m = (c / g) * s elements per group.
//   mean[n, g], rstd[n, g] = 1 / sqrt(var + eps)   (biased variance, fp32 results)
//   out = act(x_hat * weight[c] + bias[c]) + residual,  x_hat = (x - mean) * rstd
//
// Forward: statistics in one read of x (per-channel sums and sums of squares in double,
// combined per group), then one fused pass out = act(x * scale[n, c] + shift[n, c]) (+ residual)
// with scale = rstd * weight, shift = bias - mean * scale.
//
// Backward, with z = x_hat * w + b and dz = grad_out * act'(z) (z recomputed from x):
//   P1[n, c] = sum_s dz,  P2[n, c] = sum_s dz * x_hat
//   grad_weight[c] = sum_n P2[n, c],  grad_bias[c] = sum_n P1[n, c]
//   A[n, g] = sum_{c in g} w[c] P1[n, c],  B[n, g] = sum_{c in g} w[c] P2[n, c]
//   grad_x = rstd * (dz * w[c] - A / m - x_hat * B / m)
// i.e. one reduction pass and one elementwise pass. The residual's gradient is grad_out.
//
// Accumulation: fp32 elementwise math; reductions in double on the CPU; on CUDA fp32
// partials per block merged in a fixed order. Results are deterministic on both.
// weight and bias are fp32 (the binding converts them), or fp64 with fp64 x (CPU); x, residual
// and out share a dtype.
//
// The forward also comes split in two, for GroupNorm over a tensor that never exists whole (tiled
// VAE decode): group_norm_stats returns a part's per-group mean and M2 = sum (x - mean)^2, which
// merge across parts by Chan's formula without cancellation, and group_norm_apply normalises with
// given mean and rstd. Both reuse the forward's reduction and elementwise code.
#pragma once

#include <cstddef>
#include <cstdint>

#include "activations.h"
#include "common.h"

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastlatent {

enum class Layout : int { kChannelsFirst = 0, kChannelsLast = 1 };

struct GroupNormParams {
  const void* x = nullptr;         // [n, c, s] or [n, s, c], element type `dtype`
  const void* weight = nullptr;    // [c] or null (= 1): fp32, fp64 when dtype is float64
  const void* bias = nullptr;      // [c] or null (= 0): as weight
  const void* residual = nullptr;  // like x, or null
  void* out = nullptr;             // like x
  float* mean = nullptr;           // [n, groups] output
  float* rstd = nullptr;           // [n, groups] output
  int64_t n = 0, c = 0, s = 0, groups = 1;
  float eps = 1e-5f;
  DType dtype = DType::kFloat32;
  Layout layout = Layout::kChannelsFirst;
  Activation activation = Activation::kNone;
  void* workspace = nullptr;       // CUDA: group_norm_cuda_workspace_bytes(...)
};

struct GroupNormBackwardParams {
  const void* grad_out = nullptr;  // like x
  const void* x = nullptr;
  const void* weight = nullptr;    // [c] or null: fp32, fp64 when dtype is float64
  const void* bias = nullptr;      // [c] or null: as weight
  const float* mean = nullptr;     // [n, groups]
  const float* rstd = nullptr;     // [n, groups]
  void* grad_x = nullptr;          // like x
  float* grad_weight = nullptr;    // [c], or null when not needed
  float* grad_bias = nullptr;      // [c], or null when not needed
  int64_t n = 0, c = 0, s = 0, groups = 1;
  DType dtype = DType::kFloat32;
  Layout layout = Layout::kChannelsFirst;
  Activation activation = Activation::kNone;
  void* workspace = nullptr;       // CUDA: group_norm_backward_cuda_workspace_bytes(...)
};

// Statistics only: mean[n, g] and m2[n, g] = sum over the group of (x - mean)^2 (fp32 results;
// accumulated as in the forward).
struct GroupNormStatsParams {
  const void* x = nullptr;   // [n, c, s] or [n, s, c], element type `dtype`
  float* mean = nullptr;     // [n, groups] output
  float* m2 = nullptr;       // [n, groups] output
  int64_t n = 0, c = 0, s = 0, groups = 1;
  DType dtype = DType::kFloat32;
  Layout layout = Layout::kChannelsFirst;
  void* workspace = nullptr;  // CUDA: group_norm_cuda_workspace_bytes(...)
};

// Normalisation with given statistics: out = act((x - mean) * rstd * weight + bias).
struct GroupNormApplyParams {
  const void* x = nullptr;       // [n, c, s] or [n, s, c], element type `dtype`
  const float* mean = nullptr;   // [n, groups]
  const float* rstd = nullptr;   // [n, groups]
  const void* weight = nullptr;  // [c] or null (= 1): fp32, fp64 when dtype is float64
  const void* bias = nullptr;    // [c] or null (= 0): as weight
  void* out = nullptr;           // like x
  int64_t n = 0, c = 0, s = 0, groups = 1;
  DType dtype = DType::kFloat32;
  Layout layout = Layout::kChannelsFirst;
  Activation activation = Activation::kNone;
  void* workspace = nullptr;     // CUDA: group_norm_cuda_workspace_bytes(...)
};

Status run_group_norm_cpu(const GroupNormParams& params);
Status run_group_norm_stats_cpu(const GroupNormStatsParams& params);
Status run_group_norm_apply_cpu(const GroupNormApplyParams& params);
Status run_group_norm_backward_cpu(const GroupNormBackwardParams& params);

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
size_t group_norm_cuda_workspace_bytes(int64_t n, int64_t c, int64_t s);
size_t group_norm_backward_cuda_workspace_bytes(int64_t n, int64_t c, int64_t s);
cudaError_t launch_group_norm_cuda(const GroupNormParams& params, cudaStream_t stream);
cudaError_t launch_group_norm_backward_cuda(const GroupNormBackwardParams& params, cudaStream_t stream);
cudaError_t launch_group_norm_stats_cuda(const GroupNormStatsParams& params, cudaStream_t stream);
cudaError_t launch_group_norm_apply_cuda(const GroupNormApplyParams& params, cudaStream_t stream);
#endif

}  // namespace fastlatent
