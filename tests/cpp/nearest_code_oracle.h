// Brute-force nearest_code in double precision, with the rules of nearest_code.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"
#include "nearest_code.h"

namespace fl_test {

inline std::vector<int64_t> brute_force_nearest(const std::vector<float>& x, const std::vector<float>& c,
                                                int64_t n, int64_t k, int64_t d, fastlatent::Metric metric) {
  std::vector<int64_t> out(n);
  for (int64_t i = 0; i < n; ++i) {
    bool row_finite = true;
    for (int64_t t = 0; t < d; ++t) row_finite = row_finite && std::isfinite(x[i * d + t]);
    double best = std::numeric_limits<double>::infinity();
    int64_t best_index = 0;
    bool best_nan = false;
    for (int64_t j = 0; j < k && row_finite; ++j) {
      double dot = 0, cc = 0;
      bool finite = true;
      for (int64_t t = 0; t < d; ++t) {
        dot += double(x[i * d + t]) * c[j * d + t];
        cc += double(c[j * d + t]) * c[j * d + t];
        finite = finite && std::isfinite(c[j * d + t]);
      }
      if (!finite) {  // NaN key: wins, lowest index first
        if (!best_nan) best_index = j;
        best_nan = true;
        continue;
      }
      const double key = metric == fastlatent::Metric::kL2 ? cc - 2 * dot
                                                           : -dot / std::max(std::sqrt(cc), 1e-12);
      if (!best_nan && key < best) {
        best = key;
        best_index = j;
      }
    }
    out[i] = best_index;
  }
  return out;
}

inline double l2_distance(const std::vector<float>& x, const std::vector<float>& c, int64_t i, int64_t j,
                          int64_t d) {
  double s = 0;
  for (int64_t t = 0; t < d; ++t) s += (double(x[i * d + t]) - c[j * d + t]) * (double(x[i * d + t]) - c[j * d + t]);
  return s;
}

}  // namespace fl_test
