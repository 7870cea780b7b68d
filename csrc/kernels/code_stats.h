// code_stats: per-code assignment counts and vector sums, the statistics of an EMA codebook
// update and of a k-means step.
//
//   counts[c] = #{n : indices[n] == c}
//   sums[c]   = sum over {n : indices[n] == c} of x[n]
//
// Indices outside [0, k) (e.g. -1 for masked padding) are skipped.
//
// Deterministic by construction on the CPU and by default on CUDA: rows are grouped by code
// with a stable sort (counting sort on the CPU, radix sort on CUDA), and each code's rows are
// summed in increasing row order in fp32. This avoids the one-hot matmul of N x K that
// common implementations build, and float atomics, whose result depends on timing.
// CUDA also offers the atomic variant (deterministic = false): one pass, no sort; its sums
// depend on timing, its counts are exact integers (counted in uint32, rounded once to fp32).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastlatent {

struct CodeStatsParams {
  const void* x = nullptr;           // [n, d] row-major, contiguous, element type `dtype`
  const int64_t* indices = nullptr;  // [n]
  float* counts = nullptr;           // [k] output
  float* sums = nullptr;             // [k, d] output
  int64_t n = 0;
  int64_t k = 0;                     // >= 1
  int64_t d = 0;                     // >= 1
  DType dtype = DType::kFloat32;
  // CUDA only.
  bool deterministic = true;
  void* workspace = nullptr;         // code_stats_cuda_workspace_bytes(n, k, deterministic) bytes, 16-byte aligned
};

Status run_code_stats_cpu(const CodeStatsParams& params);

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
size_t code_stats_cuda_workspace_bytes(int64_t n, int64_t k, bool deterministic);
cudaError_t launch_code_stats_cuda(const CodeStatsParams& params, cudaStream_t stream);
#endif

}  // namespace fastlatent
