// CPU code_stats: a parallel stable counting sort of rows by code, then a per-code
// reduction in row order (see code_stats.h). Threads own contiguous row ranges when
// counting and scattering, so the order within a code is the row order; codes are then
// reduced independently in parallel.
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

template <typename T>
void reduce_codes(const CodeStatsParams& p, const std::vector<int64_t>& offsets,
                  const std::vector<int64_t>& order) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t d = p.d;
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t c = 0; c < p.k; ++c) {
    float* sum = p.sums + c * d;
    for (int64_t t = 0; t < d; ++t) sum[t] = 0.0f;
    for (int64_t i = offsets[c]; i < offsets[c + 1]; ++i) {
      const T* row = x + order[i] * d;
      for (int64_t t = 0; t < d; ++t) sum[t] += to_float(row[t]);
    }
    p.counts[c] = static_cast<float>(offsets[c + 1] - offsets[c]);
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
