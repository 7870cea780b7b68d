// C++ unit tests of the CPU kernels, without torch.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"
#include "common.h"
#include "nearest_code.h"
#include "nearest_code_oracle.h"

using namespace fastlatent;

static void test_half_conversions() {
  // Every fp16 bit pattern survives fp16 -> fp32 -> fp16.
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const Half h{static_cast<uint16_t>(bits)};
    const float f = to_float(h);
    const Half back = to_half(f);
    if (std::isnan(f)) {
      CHECK(std::isnan(to_float(back)), "NaN 0x%04x", bits);
    } else {
      CHECK(back.bits == h.bits, "fp16 0x%04x -> %g -> 0x%04x", bits, f, back.bits);
    }
    const BFloat16 b{static_cast<uint16_t>(bits)};
    const float fb = to_float(b);
    if (!std::isnan(fb)) CHECK(to_bfloat16(fb).bits == b.bits, "bf16 0x%04x", bits);
  }
  CHECK(to_half(1.0f).bits == 0x3c00, "1.0");
  CHECK(to_half(65504.0f).bits == 0x7bff, "max half");
  CHECK(to_half(65520.0f).bits == 0x7c00, "rounds to inf");
  CHECK(to_half(5.9604644775390625e-8f).bits == 0x0001, "smallest subnormal");
  CHECK(to_half(1.0f + 1.0f / 2048).bits == 0x3c00, "tie rounds to even (down)");
  CHECK(to_half(1.0f + 3.0f / 2048).bits == 0x3c02, "tie rounds to even (up)");
  CHECK(to_bfloat16(1.0f + 1.0f / 256).bits == 0x3f80, "bf16 tie to even");
}

static void run_case(int64_t n, int64_t k, int64_t d, Metric metric, std::mt19937& gen, bool poison) {
  std::normal_distribution<float> normal;
  std::vector<float> x(n * d), c(k * d);
  for (auto& v : x) v = normal(gen);
  for (auto& v : c) v = normal(gen);
  if (poison && n > 2) x[1 * d] = std::numeric_limits<float>::quiet_NaN();
  std::vector<int64_t> indices(n, -1);
  std::vector<float> distances(n);
  NearestCodeParams p;
  p.x = x.data();
  p.codebook = c.data();
  p.indices = indices.data();
  p.distances = distances.data();
  p.n = n;
  p.k = k;
  p.d = d;
  p.metric = metric;
  const Status status = run_nearest_code_cpu(p);
  CHECK(status.ok, "%s", status.message);
  const auto expected = fl_test::brute_force_nearest(x, c, n, k, d, metric);
  for (int64_t i = 0; i < n; ++i) {
    if (indices[i] == expected[i]) continue;
    // Only a near-tie may differ.
    const double ours = fl_test::l2_distance(x, c, i, indices[i], d);
    const double best = fl_test::l2_distance(x, c, i, expected[i], d);
    CHECK(metric == Metric::kCosine || ours - best < 1e-4 * (1 + best),
          "n=%ld k=%ld d=%ld row %ld: got %ld (%g), expected %ld (%g)", long(n), long(k), long(d), long(i),
          long(indices[i]), ours, long(expected[i]), best);
  }
  if (metric == Metric::kL2) {
    for (int64_t i = 0; i < n; ++i) {
      if (poison && i == 1) {
        CHECK(std::isnan(distances[i]), "poisoned row distance");
        continue;
      }
      const double exact = fl_test::l2_distance(x, c, i, indices[i], d);
      CHECK(std::fabs(distances[i] - exact) <= 1e-5 * (1 + exact), "distance row %ld: %g vs %g", long(i),
            distances[i], exact);
    }
  }
}

static void test_nearest_code() {
  std::mt19937 gen(42);
  const int64_t sizes[][3] = {{1, 1, 1}, {3, 17, 3}, {7, 1, 17}, {64, 16, 4}, {65, 17, 33},
                              {200, 1000, 8}, {129, 300, 257}, {5, 64, 1024},
                              {300, 70, 12}, {33, 40, 16}, {100, 33, 2}};
  for (const auto& s : sizes) {
    for (Metric metric : {Metric::kL2, Metric::kCosine}) {
      run_case(s[0], s[1], s[2], metric, gen, false);
      run_case(s[0], s[1], s[2], metric, gen, true);
    }
  }
}

static void test_nearest_code_rejects_bad_sizes() {
  NearestCodeParams p;
  p.n = 4;
  p.k = 0;
  p.d = 3;
  CHECK(!run_nearest_code_cpu(p).ok, "k = 0 must fail");
  p.n = 0;
  p.k = 3;
  CHECK(run_nearest_code_cpu(p).ok, "n = 0 is a no-op");
}

int main() {
  test_half_conversions();
  test_nearest_code();
  test_nearest_code_rejects_bad_sizes();
  if (fl_test::failures()) std::fprintf(stderr, "%d check(s) failed\n", fl_test::failures());
  else std::printf("all CPU kernel checks passed\n");
  return fl_test::failures() ? 1 : 0;
}
