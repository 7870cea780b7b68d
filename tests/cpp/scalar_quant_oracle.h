// Brute-force oracles for the scalar quantisers, in double, straight from the formulas.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace fl_test {

// FSQ level of one element with the paper's bound (L levels).
inline int64_t fsq_level(double z, int64_t L) {
  const double half_l = static_cast<double>(L - 1) * (1.0 + 1e-3) / 2.0;
  const double offset = L % 2 == 0 ? 0.5 : 0.0;
  const double y = std::tanh(z + std::atanh(offset / half_l)) * half_l - offset;
  return static_cast<int64_t>(std::nearbyint(y)) + L / 2;
}

// LFQ: per-sample entropy and average probabilities by materialising the 2^d softmax.
inline void lfq_entropy_oracle(const std::vector<float>& x, int64_t n, int d, double logit_scale,
                               std::vector<double>& per_sample, std::vector<double>& avg) {
  const int64_t codes = int64_t{1} << d;
  per_sample.assign(n, 0.0);
  avg.assign(codes, 0.0);
  std::vector<double> logits(codes);
  for (int64_t r = 0; r < n; ++r) {
    double mx = -1e300;
    for (int64_t c = 0; c < codes; ++c) {
      double l = 0.0;
      for (int i = 0; i < d; ++i) {
        const bool bit = (c >> (d - 1 - i)) & 1;
        l += (bit ? 0.5 : -0.5) * logit_scale * x[r * d + i];  // a/2 per dim: softmax over +-a/2
      }
      logits[c] = l;
      mx = l > mx ? l : mx;
    }
    double z = 0.0;
    for (int64_t c = 0; c < codes; ++c) z += std::exp(logits[c] - mx);
    for (int64_t c = 0; c < codes; ++c) {
      const double p = std::exp(logits[c] - mx) / z;
      if (p > 0) per_sample[r] -= p * std::log(p);
      avg[c] += p / static_cast<double>(n);
    }
  }
}

}  // namespace fl_test
