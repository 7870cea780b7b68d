// ema_update_: the EMA codebook update of VQ-VAE-2 / SoundStream style tokenizers, in place.
//
//   cluster_size = decay * cluster_size + (1 - decay) * counts          [k]
//   embed_sum    = decay * embed_sum    + (1 - decay) * sums            [k, d]
//   total        = sum(cluster_size)
//   smoothed[c]  = (cluster_size[c] + eps) / (total + k * eps) * total  (Laplace smoothing)
//   codebook[c]  = embed_sum[c] / smoothed[c]
//
// The same math as vector-quantize-pytorch's Codebook (lerp + laplace_smoothing). Split from
// code_stats so that data-parallel training can all-reduce counts and sums in between.
// cluster_size, embed_sum, counts and sums are fp32; the codebook may be fp32/fp16/bf16 and
// is written rounded to its dtype. `total` is summed in double in a fixed order, so the
// result is deterministic.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastlatent {

struct EmaUpdateParams {
  float* cluster_size = nullptr;  // [k] in/out
  float* embed_sum = nullptr;     // [k, d] in/out
  void* codebook = nullptr;       // [k, d] out, element type `codebook_dtype`
  const float* counts = nullptr;  // [k]
  const float* sums = nullptr;    // [k, d]
  int64_t k = 0;
  int64_t d = 0;
  float decay = 0.8f;
  float eps = 1e-5f;
  DType codebook_dtype = DType::kFloat32;
  void* workspace = nullptr;      // CUDA only: ema_update_cuda_workspace_bytes() bytes
};

Status run_ema_update_cpu(const EmaUpdateParams& params);

inline size_t ema_update_cuda_workspace_bytes() { return sizeof(double); }

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
cudaError_t launch_ema_update_cuda(const EmaUpdateParams& params, cudaStream_t stream);
#endif

}  // namespace fastlatent
