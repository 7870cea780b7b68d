// code_stats: per-code assignment counts and vector sums, the statistics of an EMA codebook
// update and of a k-means step.
//
//   counts[c] = #{n : indices[n] == c}
//   sums[c]   = sum over {n : indices[n] == c} of x[n]
//
// Indices outside [0, k) (e.g. -1 for masked padding) are skipped.
//
// Deterministic by construction on the CPU and by default on CUDA: rows are grouped by code
// with a stable sort (counting sort on the CPU, radix sort on CUDA). The sorted positions are
// cut at every multiple of kCodeStatsPieceRows, so each code's rows fall into pieces of at most
// that many; a piece is summed in increasing row order in fp32, and a code's pieces are combined
// in a pairwise tree (stride 1, 2, 4, ...). The order depends only on the indices: every run
// gives the same sums, and the CPU and CUDA kernels give the same bits. Rounding error of a sum
// of n rows: at most (kCodeStatsPieceRows - 1 + ceil(log2(pieces))) u sum |x| (u = 2^-24),
// instead of (n - 1) u sum |x| for one sequential sum; a collapsed code of 1M rows also spreads
// over thousands of CUDA blocks instead of one. This avoids the one-hot matmul of N x K that
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
  void* workspace = nullptr;         // code_stats_cuda_workspace_bytes(n, k, d, deterministic) bytes, 16-byte aligned
};

#if defined(__CUDACC__)
#define FL_CODE_STATS_HD __host__ __device__ __forceinline__
#else
#define FL_CODE_STATS_HD inline
#endif

// Rows per piece of the deterministic sums (see above). 128 keeps the partial sums at
// 2 n / 128 rows of d floats and gives a 1M-row code 8192 pieces to spread over the GPU.
constexpr int64_t kCodeStatsPieceRows = 128;

// Pieces of the code whose rows sit at sorted positions [begin, end): 0 for an empty code.
FL_CODE_STATS_HD int64_t code_stats_piece_count(int64_t begin, int64_t end) {
  return end > begin ? (end - 1) / kCodeStatsPieceRows - begin / kCodeStatsPieceRows + 1 : 0;
}

// Row of piece j's partial sums, for a code of two or more pieces starting at `begin`: the
// first piece at 2 m0 (m0 = begin / kCodeStatsPieceRows), piece j > 0 at 2 (m0 + j) + 1. Such
// codes never share a row, so 2 (n / kCodeStatsPieceRows + 1) rows hold every partial.
FL_CODE_STATS_HD int64_t code_stats_partial_row(int64_t begin, int64_t j) {
  const int64_t m0 = begin / kCodeStatsPieceRows;
  return j == 0 ? 2 * m0 : 2 * (m0 + j) + 1;
}

Status run_code_stats_cpu(const CodeStatsParams& params);

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
size_t code_stats_cuda_workspace_bytes(int64_t n, int64_t k, int64_t d, bool deterministic);
cudaError_t launch_code_stats_cuda(const CodeStatsParams& params, cudaStream_t stream);
#endif

}  // namespace fastlatent
