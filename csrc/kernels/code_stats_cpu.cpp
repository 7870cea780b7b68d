// CPU code_stats: a parallel stable counting sort of rows by code, then a per-code
// reduction (see code_stats.h). Threads own contiguous row ranges when counting and
// scattering, so the order within a code is the row order; codes are then reduced
// independently in parallel, each in the CUDA kernel's order: pieces cut at multiples of
// kCodeStatsPieceRows of the sorted positions, summed in row order, combined pairwise.
#include "code_stats.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "dispatch.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastlatent {
namespace {

// sum[t] = sum of x[order[i]][t] for i in [lo, hi), in that order.
template <typename T>
void sum_rows(const T* x, int64_t d, const std::vector<int64_t>& order, int64_t lo, int64_t hi, float* sum) {
  for (int64_t t = 0; t < d; ++t) sum[t] = 0.0f;
  for (int64_t i = lo; i < hi; ++i) {
    const T* row = x + order[i] * d;
    for (int64_t t = 0; t < d; ++t) sum[t] += to_float(row[t]);
  }
}

template <typename T>
void reduce_codes(const CodeStatsParams& p, const std::vector<int64_t>& offsets,
                  const std::vector<int64_t>& order) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t d = p.d;
#pragma omp parallel
  {
    std::vector<float> pieces_sums;  // [pieces, d] of the current multi-piece code
#pragma omp for schedule(dynamic, 16)
    for (int64_t c = 0; c < p.k; ++c) {
      const int64_t begin = offsets[c], end = offsets[c + 1];
      const int64_t pieces = code_stats_piece_count(begin, end);
      float* sum = p.sums + c * d;
      p.counts[c] = static_cast<float>(end - begin);
      if (pieces <= 1) {
        sum_rows(x, d, order, begin, end, sum);
        continue;
      }
      pieces_sums.resize(static_cast<size_t>(pieces * d));
      const int64_t m0 = begin / kCodeStatsPieceRows;
      for (int64_t j = 0; j < pieces; ++j) {
        const int64_t lo = std::max(begin, (m0 + j) * kCodeStatsPieceRows);
        const int64_t hi = std::min(end, (m0 + j + 1) * kCodeStatsPieceRows);
        sum_rows(x, d, order, lo, hi, pieces_sums.data() + j * d);
      }
      // the pairwise tree: piece j += piece j + stride for j a multiple of 2 stride
      for (int64_t stride = 1; stride < pieces; stride *= 2) {
        for (int64_t j = 0; j + stride < pieces; j += 2 * stride) {
          float* a = pieces_sums.data() + j * d;
          const float* b = pieces_sums.data() + (j + stride) * d;
          for (int64_t t = 0; t < d; ++t) a[t] += b[t];
        }
      }
      std::copy(pieces_sums.begin(), pieces_sums.begin() + d, sum);
    }
  }
}

}  // namespace

Status run_code_stats_cpu(const CodeStatsParams& p) {
  if (p.k < 1 || p.d < 1 || p.n < 0) return Status::Error("code_stats: need n >= 0, k >= 1, d >= 1");
  const int64_t n = p.n, k = p.k;
#ifdef _OPENMP
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), n / 4096)));
#else
  const int threads = 1;
#endif
  // histogram[t][c]: rows of thread t's range assigned to code c (then turned into offsets).
  std::vector<int64_t> histogram(static_cast<size_t>(threads) * k, 0);
  auto row_range = [&](int t, int64_t& begin, int64_t& end) {
    begin = n * t / threads;
    end = n * (t + 1) / threads;
  };
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) {
    int64_t begin, end;
    row_range(t, begin, end);
    int64_t* h = histogram.data() + static_cast<size_t>(t) * k;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = p.indices[i];
      if (c >= 0 && c < k) ++h[c];
    }
  }
  // offsets[c]: first slot of code c; thread t writes code c after threads 0..t-1.
  std::vector<int64_t> offsets(k + 1, 0);
  int64_t running = 0;
  for (int64_t c = 0; c < k; ++c) {
    offsets[c] = running;
    for (int t = 0; t < threads; ++t) {
      int64_t& h = histogram[static_cast<size_t>(t) * k + c];
      const int64_t count = h;
      h = running;
      running += count;
    }
  }
  offsets[k] = running;
  std::vector<int64_t> order(static_cast<size_t>(running));
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) {
    int64_t begin, end;
    row_range(t, begin, end);
    int64_t* next = histogram.data() + static_cast<size_t>(t) * k;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = p.indices[i];
      if (c >= 0 && c < k) order[next[c]++] = i;
    }
  }
  return FL_DTYPE_SWITCH(p.dtype, scalar_t, Status::Error("code_stats: unsupported dtype"), [&] {
    reduce_codes<scalar_t>(p, offsets, order);
    return Status::Ok();
  });
}

}  // namespace fastlatent
