// C++ unit tests of the CPU kernels, without torch.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "bsq.h"
#include "check.h"
#include "code_stats.h"
#include "common.h"
#include "ema_update.h"
#include "group_norm.h"
#include "fsq.h"
#include "lfq.h"
#include "nearest_code.h"
#include "nearest_code_oracle.h"
#include "scalar_quant_oracle.h"
#include "philox.h"
#include "residual_fsq.h"
#include "sample_code.h"
#include "sampler_step.h"

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
  // The portable conversions (used where the compiler has no hardware fp16) agree bit for bit.
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const Half h{static_cast<uint16_t>(bits)};
    const float a = to_float(h), b = half_to_float_portable(h);
    CHECK((std::isnan(a) && std::isnan(b)) || float_to_bits(a) == float_to_bits(b), "portable fp16 0x%04x", bits);
  }
  std::mt19937 gen(11);
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 1000000; ++i) {
    const float f = bits_to_float(any_bits(gen));
    const Half a = to_half(f), b = float_to_half_portable(f);
    CHECK((std::isnan(f) && (a.bits & 0x7c00) == 0x7c00 && (b.bits & 0x7c00) == 0x7c00) || a.bits == b.bits,
          "portable to_half(%g): 0x%04x vs 0x%04x", f, a.bits, b.bits);
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

// Batched searches (multi-head VQ): every search sees its own rows and codebook only.
static void test_nearest_code_batched() {
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  const int64_t batch = 3, n = 45, k = 37, d = 20;
  std::vector<float> x(batch * n * d), c(batch * k * d);
  for (auto& v : x) v = normal(gen);
  for (auto& v : c) v = normal(gen);
  std::vector<int64_t> indices(batch * n, -1);
  std::vector<float> distances(batch * n);
  NearestCodeParams p;
  p.x = x.data();
  p.codebook = c.data();
  p.indices = indices.data();
  p.distances = distances.data();
  p.n = n;
  p.k = k;
  p.d = d;
  p.batch = batch;
  const Status status = run_nearest_code_cpu(p);
  CHECK(status.ok, "%s", status.message);
  for (int64_t b = 0; b < batch; ++b) {
    const std::vector<float> xb(x.begin() + b * n * d, x.begin() + (b + 1) * n * d);
    const std::vector<float> cb(c.begin() + b * k * d, c.begin() + (b + 1) * k * d);
    const auto expected = fl_test::brute_force_nearest(xb, cb, n, k, d, Metric::kL2);
    for (int64_t i = 0; i < n; ++i) {
      CHECK(indices[b * n + i] == expected[i], "search %ld row %ld: got %ld, expected %ld", long(b), long(i),
            long(indices[b * n + i]), long(expected[i]));
      const double exact = fl_test::l2_distance(xb, cb, i, expected[i], d);
      CHECK(std::fabs(distances[b * n + i] - exact) <= 1e-5 * (1 + exact), "search %ld distance", long(b));
    }
  }
  p.batch = 0;
  CHECK(run_nearest_code_cpu(p).ok, "batch = 0 is a no-op");
  p.batch = -1;
  CHECK(!run_nearest_code_cpu(p).ok, "batch < 0 must fail");
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

// The CUDA launcher's choice of search kernel: tensor cores only for an aligned x and codebook,
// a row length of whole 16-byte vectors and an image compiled with WMMA for the dtype.
static void test_nearest_code_cuda_path() {
  alignas(16) static const uint8_t buffer[64] = {};
  using P = NearestCodeCudaPath;
  auto path = [&](DType dtype, int64_t d, size_t x_offset, size_t code_offset, int arch, bool tf32 = false) {
    NearestCodeParams p;
    p.x = buffer + x_offset;
    p.codebook = buffer + code_offset;
    p.n = 10;
    p.k = 100;
    p.d = d;
    p.dtype = dtype;
    p.allow_tf32 = tf32;
    return nearest_code_cuda_path(p, arch);
  };
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    CHECK(path(dtype, 64, 0, 0, 80) == P::kTensorCore, "aligned fp16/bf16, d = 64, sm_80");
    CHECK(path(dtype, 64, 0, 0, 90) == P::kTensorCore, "sm_90 image");
    CHECK(path(dtype, 32, 0, 0, 80) == P::kSmallD, "d <= 32 takes the small-D kernel");
    CHECK(path(dtype, 33, 6, 2, 0) == P::kSimt, "d = 33, misaligned, no arch");
    CHECK(path(dtype, 36, 0, 0, 80) == P::kSimt, "d %% 8 != 0: rows are not whole 16-byte vectors");
    // buf[3:3 + N * D].view(N, D): a storage offset of 3 elements (6 bytes).
    CHECK(path(dtype, 64, 6, 0, 80) == P::kSimt, "misaligned x");
    CHECK(path(dtype, 64, 0, 6, 80) == P::kSimt, "misaligned codebook");
    CHECK(path(dtype, 64, 16, 32, 80) == P::kTensorCore, "offsets of whole vectors stay aligned");
  }
  // A compute_75 image has fp16 WMMA but no bf16 or TF32 WMMA.
  CHECK(path(DType::kFloat16, 64, 0, 0, 75) == P::kTensorCore, "fp16 on a sm_75 image");
  CHECK(path(DType::kBFloat16, 64, 0, 0, 75) == P::kSimt, "bf16 on a sm_75 image");
  CHECK(path(DType::kFloat32, 64, 0, 0, 75, true) == P::kSimt, "tf32 on a sm_75 image");
  CHECK(path(DType::kFloat32, 64, 0, 0, 80, true) == P::kTensorCore, "tf32 on sm_80");
  CHECK(path(DType::kFloat32, 64, 0, 0, 80, false) == P::kSimt, "fp32 without tf32 stays exact");
  CHECK(path(DType::kFloat32, 36, 0, 0, 80, true) == P::kTensorCore, "tf32, d %% 4 == 0");
  CHECK(path(DType::kFloat32, 34, 0, 0, 80, true) == P::kSimt, "tf32, d %% 4 != 0");
  CHECK(path(DType::kFloat32, 64, 8, 0, 80, true) == P::kSimt, "tf32, x 8-byte aligned only");
}

static void test_code_stats() {
  std::mt19937 gen(3);
  std::normal_distribution<float> normal;
  for (const int64_t n : {0, 1, 7, 5000, 20000}) {
    const int64_t k = 37, d = 5;
    std::vector<float> x(n * d);
    std::vector<int64_t> indices(n);
    for (auto& v : x) v = normal(gen);
    for (int64_t i = 0; i < n; ++i) indices[i] = static_cast<int64_t>(gen() % (k + 2)) - 1;  // -1 and k skipped
    std::vector<float> counts(k), sums(k * d);
    CodeStatsParams p;
    p.x = x.data();
    p.indices = indices.data();
    p.counts = counts.data();
    p.sums = sums.data();
    p.n = n;
    p.k = k;
    p.d = d;
    CHECK(run_code_stats_cpu(p).ok, "code_stats status");
    // The documented order (code_stats.h), which the kernel promises bit for bit: rows sorted stably by
    // code, sorted positions cut at multiples of kCodeStatsPieceRows, each piece summed in row order in
    // fp32, a code's pieces combined pairwise (stride 1, 2, 4, ...).
    std::vector<float> want_counts(k, 0.0f), want_sums(k * d, 0.0f);
    int64_t begin = 0;  // the code's first sorted position
    for (int64_t c = 0; c < k; ++c) {
      std::vector<int64_t> rows;
      for (int64_t i = 0; i < n; ++i)
        if (indices[i] == c) rows.push_back(i);
      const int64_t end = begin + static_cast<int64_t>(rows.size());
      std::vector<std::vector<float>> pieces;
      for (int64_t pos = begin; pos < end;) {
        const int64_t stop = std::min(end, (pos / kCodeStatsPieceRows + 1) * kCodeStatsPieceRows);
        std::vector<float> piece(d, 0.0f);
        for (; pos < stop; ++pos)
          for (int64_t t = 0; t < d; ++t) piece[t] += x[rows[pos - begin] * d + t];
        pieces.push_back(piece);
      }
      for (size_t stride = 1; stride < pieces.size(); stride *= 2)
        for (size_t j = 0; j + stride < pieces.size(); j += 2 * stride)
          for (int64_t t = 0; t < d; ++t) pieces[j][t] += pieces[j + stride][t];
      want_counts[c] = static_cast<float>(rows.size());
      if (!pieces.empty()) std::copy(pieces[0].begin(), pieces[0].end(), want_sums.begin() + c * d);
      begin = end;
    }
    for (int64_t c = 0; c < k; ++c) CHECK(counts[c] == want_counts[c], "count of code %ld", long(c));
    for (int64_t e = 0; e < k * d; ++e) CHECK(sums[e] == want_sums[e], "sum element %ld (n=%ld)", long(e), long(n));
  }
}

static void test_ema_update() {
  const int64_t k = 4, d = 3;
  std::vector<float> cluster_size = {1, 2, 0, 5}, embed_sum(k * d, 1.0f), codebook(k * d);
  std::vector<float> counts = {3, 0, 1, 1}, sums(k * d, 2.0f);
  EmaUpdateParams p;
  p.cluster_size = cluster_size.data();
  p.embed_sum = embed_sum.data();
  p.codebook = codebook.data();
  p.counts = counts.data();
  p.sums = sums.data();
  p.k = k;
  p.d = d;
  p.decay = 0.5f;
  p.eps = 1e-5f;
  CHECK(run_ema_update_cpu(p).ok, "ema status");
  const float want_sizes[] = {2.0f, 1.0f, 0.5f, 3.0f};
  double total = 0;
  for (int64_t c = 0; c < k; ++c) {
    CHECK(cluster_size[c] == want_sizes[c], "cluster size %ld", long(c));
    total += want_sizes[c];
  }
  for (int64_t c = 0; c < k; ++c) {
    const double smoothed = (want_sizes[c] + 1e-5) / (total + k * 1e-5) * total;
    for (int64_t t = 0; t < d; ++t) {
      CHECK(embed_sum[c * d + t] == 1.5f, "embed_sum");
      CHECK(std::fabs(codebook[c * d + t] - 1.5 / smoothed) < 1e-6, "codebook %ld: %g vs %g", long(c),
            codebook[c * d + t], 1.5 / smoothed);
    }
  }
}

static void test_fsq() {
  std::mt19937 gen(3);
  std::normal_distribution<float> normal(0.0f, 2.5f);
  const std::vector<std::vector<int64_t>> level_lists = {{8, 5, 5, 5}, {8, 8, 8, 5, 5, 5}, {7, 5, 5, 5, 5},
                                                         std::vector<int64_t>(16, 2)};
  for (const auto& levels : level_lists) {
    const int d = static_cast<int>(levels.size());
    for (int64_t rows : {int64_t{1}, int64_t{7}, int64_t{257}, int64_t{3001}}) {
      std::vector<float> z(rows * d), z_hat(rows * d), codes(rows * d), grad(rows * d), ones(rows * d, 1.0f);
      for (auto& v : z) v = normal(gen);
      std::vector<int64_t> indices(rows);
      FsqParams p;
      fsq_make_constants(levels.data(), d, false, p);
      p.rows = rows;
      FsqForwardArgs fwd{z.data(), z_hat.data(), indices.data()};
      CHECK(run_fsq_quantize_cpu(p, fwd).ok, "fsq forward");
      for (int64_t r = 0; r < rows; ++r) {
        int64_t index = 0, basis = 1;
        for (int i = 0; i < d; ++i) {
          const int64_t k = fl_test::fsq_level(z[r * d + i], levels[i]);
          const float value = static_cast<float>(k - levels[i] / 2) / static_cast<float>(levels[i] / 2);
          CHECK(z_hat[r * d + i] == value, "fsq value row %ld dim %d: %g vs %g", long(r), i, z_hat[r * d + i], value);
          index += k * basis;
          basis *= levels[i];
        }
        CHECK(indices[r] == index, "fsq index row %ld: %ld vs %ld", long(r), long(indices[r]), long(index));
      }
      FsqCodesArgs back{indices.data(), codes.data()};
      CHECK(run_fsq_indices_to_codes_cpu(p, back).ok, "fsq codes");
      CHECK(codes == z_hat, "indices_to_codes round trip");
      FsqBackwardArgs bwd{ones.data(), z.data(), grad.data()};
      CHECK(run_fsq_quantize_backward_cpu(p, bwd).ok, "fsq backward");
      for (int64_t e = 0; e < rows * d; ++e) {
        const int64_t L = levels[e % d];
        const double half_l = static_cast<double>(L - 1) * (1.0 + 1e-3) / 2.0;
        const double t = std::tanh(z[e] + std::atanh((L % 2 == 0 ? 0.5 : 0.0) / half_l));
        const double want = (1 - t * t) * half_l / static_cast<double>(L / 2);
        CHECK(std::fabs(grad[e] - want) <= 1e-5 * (std::fabs(want) + 1e-3), "fsq grad %ld: %g vs %g", long(e), grad[e],
              want);
      }
    }
  }
}

// levels = [2^31] (the largest the binding admits): the level count survives (an int32 field
// wraps to -2^31) and the extreme levels come out exact in both bounds.
static void test_fsq_extreme_levels() {
  const int64_t big[] = {int64_t{1} << 31};
  for (const bool sym : {false, true}) {
    FsqParams p;
    fsq_make_constants(big, 1, sym, p);
    CHECK(p.channel[0].levels == (int64_t{1} << 31), "levels field: %lld", static_cast<long long>(p.channel[0].levels));
    CHECK(p.channel[0].half_width == (int64_t{1} << 30), "half width");
    CHECK(p.codebook_size == (int64_t{1} << 31), "codebook size");
    const double inf = std::numeric_limits<double>::infinity();
    const double z[] = {-inf, inf, 0.0};
    double z_hat[3];
    int64_t indices[3];
    p.rows = 3;
    p.dtype = DType::kFloat64;
    FsqForwardArgs args;
    args.z = z;
    args.z_hat = z_hat;
    args.indices = indices;
    CHECK(run_fsq_quantize_cpu(p, args).ok, "fsq status");
    const int64_t want[] = {0, (int64_t{1} << 31) - 1, int64_t{1} << 30};
    for (int i = 0; i < 3; ++i) {
      CHECK(indices[i] == want[i], "sym=%d row %d: index %lld, want %lld", int(sym), i,
            static_cast<long long>(indices[i]), static_cast<long long>(want[i]));
    }
    CHECK(z_hat[0] == -1.0 && z_hat[2] == (sym ? 1.0 / double((int64_t{1} << 31) - 1) : 0.0), "values %g %g",
          z_hat[0], z_hat[2]);
  }
}

static void test_lfq_entropy() {
  std::mt19937 gen(4);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  for (int d : {1, 2, 5, 9, 12}) {
    const int64_t n = 67;
    std::vector<float> x(n * d), per_sample(n), avg(int64_t{1} << d);
    for (auto& v : x) v = normal(gen);
    LfqEntropyParams p;
    p.x = x.data();
    p.n = n;
    p.d = d;
    p.logit_scale = 4.0 * 0.9 * 2.0;
    p.per_sample_entropy = per_sample.data();
    p.avg_probs = avg.data();
    CHECK(run_lfq_entropy_cpu(p).ok, "lfq entropy");
    std::vector<double> want_ps, want_avg;
    fl_test::lfq_entropy_oracle(x, n, d, p.logit_scale, want_ps, want_avg);
    for (int64_t r = 0; r < n; ++r)
      CHECK(std::fabs(per_sample[r] - want_ps[r]) <= 2e-6 + 1e-5 * want_ps[r], "lfq ps d=%d row %ld: %g vs %g", d,
            long(r), per_sample[r], want_ps[r]);
    for (size_t c = 0; c < avg.size(); ++c)
      CHECK(std::fabs(avg[c] - want_avg[c]) <= 1e-5 * want_avg[c] + 1e-10, "lfq avg d=%d code %zu: %g vs %g", d, c,
            avg[c], want_avg[c]);
  }
}

static void test_lfq_and_bsq_quantize() {
  const float x[] = {0.5f, -1.0f, 0.0f, 2.0f, -0.1f, 0.2f, 3.0f, -4.0f};
  float q[8];
  int64_t indices[2];
  LfqQuantizeParams p;
  p.x = x;
  p.quantized = q;
  p.indices = indices;
  p.n = 2;
  p.d = 4;
  p.codebook_scale = 0.5;
  CHECK(run_lfq_quantize_cpu(p).ok, "lfq quantize");
  CHECK(indices[0] == 0b1001 && indices[1] == 0b0110, "lfq indices %ld %ld", long(indices[0]), long(indices[1]));
  CHECK(q[0] == 0.5f && q[1] == -0.5f && q[2] == -0.5f, "lfq values");
  BsqParams b;
  b.z = x;
  b.quantized = q;
  b.indices = indices;
  b.n = 2;
  b.d = 4;
  CHECK(run_bsq_quantize_cpu(b).ok, "bsq quantize");
  CHECK(indices[0] == 0b1001 && q[0] == 0.5f && q[1] == -0.5f, "bsq values");
}

static void test_philox() {
  // Random123 known-answer vectors for philox4x32_10.
  const struct { uint32_t ctr[4], key[2], out[4]; } kat[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const auto& v : kat) {
    const philox::Words w = philox::philox4x32_10(v.ctr[0], v.ctr[1], v.ctr[2], v.ctr[3], v.key[0], v.key[1]);
    for (int j = 0; j < 4; ++j) CHECK(w.w[j] == v.out[j], "philox word %d: %08x vs %08x", j, w.w[j], v.out[j]);
  }
  // The IEEE-only log and sincos against double precision, over the whole 24-bit input range.
  double worst_log = 0, worst_trig = 0;
  for (uint32_t k = 1; k <= (1u << 24); k += 37) {
    const float u = static_cast<float>(k) * 5.9604644775390625e-8f;
    const double exact = -2.0 * std::log(static_cast<double>(u));
    if (exact > 0) worst_log = std::max(worst_log, std::fabs(philox::minus_two_log(u) - exact) / exact);
    float c, sn;
    philox::sincos_turns(k - 1, c, sn);
    const double angle = 2.0 * 3.14159265358979323846 * (static_cast<double>(k - 1) * 5.9604644775390625e-8);
    worst_trig = std::max({worst_trig, std::fabs(c - std::cos(angle)), std::fabs(sn - std::sin(angle))});
  }
  CHECK(worst_log < 3e-7, "-2 ln u relative error %g", worst_log);
  CHECK(worst_trig < 2e-7, "sincos absolute error %g", worst_trig);
  // Moments of the stream.
  double sum = 0, sum2 = 0;
  const int64_t count = 1 << 20;
  for (int64_t e = 0; e < count; ++e) {
    const double z = philox::normal_at(7, 1, static_cast<uint64_t>(e));
    sum += z;
    sum2 += z * z;
  }
  CHECK(std::fabs(sum / count) < 5e-3 && std::fabs(sum2 / count - 1) < 5e-3, "mean %g, var %g", sum / count,
        sum2 / count);
}

// sample_code: the noise against double precision, and every draw against a brute-force oracle (double
// logits, the same fp32 noise, argmax over all codes); draws may differ only at fp32 near-ties.
static void test_sample_code() {
  double worst = 0;
  for (uint64_t word = 0; word < (uint64_t{1} << 32); word += 65521) {
    const double u = (static_cast<double>(static_cast<uint32_t>(word) >> 9) + 0.5) / 8388608.0;
    const double exact = -std::log(-std::log(u));
    worst = std::max(worst, std::fabs(gumbel_from_word(static_cast<uint32_t>(word)) - exact));
  }
  CHECK(worst < 1e-5, "Gumbel noise absolute error %g", worst);
  std::mt19937 gen(11);
  std::normal_distribution<float> normal;
  for (Metric metric : {Metric::kL2, Metric::kCosine}) {
    const int64_t batch = 2, n = 45, k = 77, d = 19;
    std::vector<float> x(batch * n * d), c(batch * k * d);
    for (auto& v : x) v = normal(gen);
    for (auto& v : c) v = normal(gen);
    std::vector<int64_t> out(batch * n, -1);
    SampleCodeParams p;
    p.x = x.data();
    p.codebook = c.data();
    p.indices = out.data();
    p.n = n;
    p.k = k;
    p.d = d;
    p.batch = batch;
    p.inv_temperature = 1.0f / 0.7f;
    p.seed = 99;
    p.offset = 3;
    p.metric = metric;
    CHECK(run_sample_code_cpu(p).ok, "sample_code failed");
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t r = 0; r < n; ++r) {
        const float* xr = &x[(b * n + r) * d];
        std::vector<double> keys(k);
        for (int64_t j = 0; j < k; ++j) {
          const float* cj = &c[(b * k + j) * d];
          double dot = 0, xx = 0, cc = 0;
          for (int64_t t = 0; t < d; ++t) {
            dot += double(xr[t]) * cj[t];
            xx += double(xr[t]) * xr[t];
            cc += double(cj[t]) * cj[t];
          }
          const double logit = metric == Metric::kL2 ? -std::sqrt(std::max(xx + cc - 2 * dot, 1e-8))
                                                     : dot / (std::sqrt(xx) * std::sqrt(cc));
          keys[j] = logit / 0.7 + gumbel_noise(99, 3, static_cast<uint64_t>((b * n + r) * k + j));
        }
        const int64_t best = std::max_element(keys.begin(), keys.end()) - keys.begin();
        const int64_t got = out[b * n + r];
        CHECK(got >= 0 && got < k && keys[best] - keys[got] < 1e-4, "row %lld: drew %lld, oracle %lld",
              static_cast<long long>(r), static_cast<long long>(got), static_cast<long long>(best));
      }
  }
}

// DDIM with guidance, rescale and dynamic thresholding against a direct double-precision oracle.
static void test_sampler_step() {
  std::mt19937 gen(11);
  std::normal_distribution<float> normal;
  const int64_t b = 3, n = 1031;  // n off every vector and chunk width
  const double ab_t = 0.2, ab_prev = 0.6, eta = 0.5, g = 6.0, phi = 0.6, p_q = 0.95, s_max = 1.7;
  std::vector<float> model(2 * b * n), x(b * n), out(b * n), x0_out(b * n);
  for (auto& v : model) v = 2 * normal(gen);
  for (auto& v : x) v = normal(gen);
  SamplerStepParams p;
  p.model_output = model.data();
  p.sample = x.data();
  p.out = out.data();
  p.x0_out = x0_out.data();
  p.batch = b;
  p.n = n;
  p.guided = true;
  p.guidance_scale = static_cast<float>(g);
  p.guidance_rescale = static_cast<float>(phi);
  p.x0_mode = X0Mode::kThreshold;
  p.threshold_quantile = p_q;
  p.threshold_max = static_cast<float>(s_max);
  p.seed = 99;
  p.offset = 4;
  CHECK(fold(ddim_form(ab_t, ab_prev, eta, Prediction::kEpsilon, false), p.x0_mode, true, p.c).ok, "fold");
  CHECK(run_sampler_step_cpu(p).ok, "sampler step status");
  const double alpha = std::sqrt(ab_t), sigma = std::sqrt(1 - ab_t);
  const double var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev), sd = eta * std::sqrt(var);
  double worst = 0, scale = 0;
  for (int64_t s = 0; s < b; ++s) {
    std::vector<double> m(n), c(n);
    double mc = 0, mm = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double u = model[s * n + i];
      c[i] = model[(b + s) * n + i];
      m[i] = u + g * (c[i] - u);
      mc += c[i] / n;
      mm += m[i] / n;
    }
    double vc = 0, vm = 0;
    for (int64_t i = 0; i < n; ++i) {
      vc += (c[i] - mc) * (c[i] - mc) / (n - 1);
      vm += (m[i] - mm) * (m[i] - mm) / (n - 1);
    }
    std::vector<double> x0(n), sorted(n);
    for (int64_t i = 0; i < n; ++i) {
      m[i] = phi * m[i] * std::sqrt(vc / vm) + (1 - phi) * m[i];
      x0[i] = (x[s * n + i] - sigma * m[i]) / alpha;
      sorted[i] = std::fabs(x0[i]);
    }
    std::sort(sorted.begin(), sorted.end());
    const double pos = p_q * (n - 1), lo = std::floor(pos);
    const double q = sorted[int64_t(lo)] + (pos - lo) * (sorted[int64_t(lo) + 1] - sorted[int64_t(lo)]);
    const double th = std::min(std::max(q, 1.0), s_max);
    for (int64_t i = 0; i < n; ++i) {
      const double x0c = std::min(std::max(x0[i], -th), th) / th;
      const double z = philox::normal_at(99, 4, static_cast<uint64_t>(s * n + i));
      const double want = std::sqrt(ab_prev) * x0c + std::sqrt(1 - ab_prev - sd * sd) * m[i] + sd * z;
      worst = std::max({worst, std::fabs(out[s * n + i] - want), std::fabs(x0_out[s * n + i] - x0c)});
      scale = std::max(scale, std::fabs(want));
    }
  }
  CHECK(worst <= 1e-5 * scale, "ddim step: max error %g (scale %g)", worst, scale);
  // The noise is a pure function of (seed, offset, element): a 1-thread rerun is bitwise equal.
  std::vector<float> again(b * n);
  p.out = again.data();
  p.x0_out = nullptr;
  CHECK(run_sampler_step_cpu(p).ok, "rerun");
  CHECK(std::equal(out.begin(), out.end(), again.begin()), "rerun must be bitwise identical");
  // A model output copy is made of unguided steps only (a guided model output is [2B, N])
  std::vector<float> copy(2 * b * n, 0.0f);
  p.model_output_copy = copy.data();
  CHECK(!run_sampler_step_cpu(p).ok, "a guided step must refuse a model output copy");
  // Unguided (Heun's first stage: x + dt m, x0 = x - sigma m): the copy is model_output's values, the
  // outputs those of the same step without it
  SamplerStepParams h;
  h.model_output = model.data();
  h.sample = x.data();
  h.batch = b;
  h.n = n;
  h.c.x0_x = 1.0f;
  h.c.x0_m = -0.8f;
  h.c.out_x = 1.0f;
  h.c.out_m = -0.3f;
  std::vector<float> plain_out(b * n), plain_x0(b * n), kept_out(b * n), kept_x0(b * n);
  h.out = plain_out.data();
  h.x0_out = plain_x0.data();
  CHECK(run_sampler_step_cpu(h).ok, "heun stage");
  h.out = kept_out.data();
  h.x0_out = kept_x0.data();
  h.model_output_copy = copy.data();
  CHECK(run_sampler_step_cpu(h).ok, "heun stage with a model output copy");
  CHECK(std::equal(model.begin(), model.begin() + b * n, copy.begin()), "the copy must be the model output");
  CHECK(std::all_of(copy.begin() + b * n, copy.end(), [](float v) { return v == 0.0f; }), "copy overran");
  CHECK(plain_out == kept_out && plain_x0 == kept_x0, "the copy must not change the step");
}

// GroupNorm + SiLU over [n, c, s] in double, element (i, ch, p) at the layout's offset.
static std::vector<double> group_norm_oracle(const std::vector<float>& x, const std::vector<float>& w,
                                             const std::vector<float>& b, int64_t n, int64_t c, int64_t s,
                                             int64_t groups, Layout layout) {
  auto at = [&](int64_t i, int64_t ch, int64_t p) {
    return layout == Layout::kChannelsFirst ? (i * c + ch) * s + p : (i * s + p) * c + ch;
  };
  std::vector<double> out(x.size());
  const int64_t per = c / groups;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t g = 0; g < groups; ++g) {
      double mean = 0, var = 0;
      for (int64_t ch = g * per; ch < (g + 1) * per; ++ch)
        for (int64_t p = 0; p < s; ++p) mean += x[at(i, ch, p)];
      mean /= per * s;
      for (int64_t ch = g * per; ch < (g + 1) * per; ++ch)
        for (int64_t p = 0; p < s; ++p) var += (x[at(i, ch, p)] - mean) * (x[at(i, ch, p)] - mean);
      var /= per * s;
      for (int64_t ch = g * per; ch < (g + 1) * per; ++ch)
        for (int64_t p = 0; p < s; ++p) {
          const double z = (x[at(i, ch, p)] - mean) / std::sqrt(var + 1e-5) * w[ch] + b[ch];
          out[at(i, ch, p)] = z / (1 + std::exp(-z));
        }
    }
  return out;
}

static void test_group_norm() {
  std::mt19937 gen(17);
  std::normal_distribution<float> normal(3.0f, 2.0f);
  for (Layout layout : {Layout::kChannelsFirst, Layout::kChannelsLast})
    for (const auto& dims : std::vector<std::array<int64_t, 4>>{{2, 6, 7, 3}, {1, 8, 300, 4}, {3, 4, 1, 1}}) {
      const int64_t n = dims[0], c = dims[1], s = dims[2], groups = dims[3];
      std::vector<float> x(n * c * s), w(c), b(c), out(x.size()), mean(n * groups), rstd(n * groups);
      for (auto& v : x) v = normal(gen);
      for (auto& v : w) v = normal(gen);
      for (auto& v : b) v = normal(gen);
      GroupNormParams p;
      p.x = x.data();
      p.weight = w.data();
      p.bias = b.data();
      p.out = out.data();
      p.mean = mean.data();
      p.rstd = rstd.data();
      p.n = n;
      p.c = c;
      p.s = s;
      p.groups = groups;
      p.layout = layout;
      p.activation = Activation::kSilu;
      CHECK(run_group_norm_cpu(p).ok, "group_norm status");
      const auto want = group_norm_oracle(x, w, b, n, c, s, groups, layout);
      for (size_t e = 0; e < x.size(); ++e)
        CHECK(std::fabs(out[e] - want[e]) < 2e-5 * (1 + std::fabs(want[e])), "group_norm element %zu: %g vs %g", e,
              out[e], want[e]);
      // Backward: d(sum(out * probe))/dx against central differences of the oracle.
      std::vector<float> probe(x.size()), grad_x(x.size()), grad_w(c), grad_b(c);
      for (auto& v : probe) v = normal(gen);
      GroupNormBackwardParams q;
      q.grad_out = probe.data();
      q.x = x.data();
      q.weight = w.data();
      q.bias = b.data();
      q.mean = mean.data();
      q.rstd = rstd.data();
      q.grad_x = grad_x.data();
      q.grad_weight = grad_w.data();
      q.grad_bias = grad_b.data();
      q.n = n;
      q.c = c;
      q.s = s;
      q.groups = groups;
      q.layout = layout;
      q.activation = Activation::kSilu;
      CHECK(run_group_norm_backward_cpu(q).ok, "group_norm_backward status");
      for (size_t e = 0; e < x.size(); e += 7) {
        std::vector<float> xp = x, xm = x;
        const float h = 1e-2f;
        xp[e] += h;
        xm[e] -= h;
        const auto op = group_norm_oracle(xp, w, b, n, c, s, groups, layout);
        const auto om = group_norm_oracle(xm, w, b, n, c, s, groups, layout);
        double numeric = 0;
        for (size_t k = 0; k < x.size(); ++k) numeric += probe[k] * (op[k] - om[k]) / (2.0 * (xp[e] - x[e]));
        CHECK(std::fabs(grad_x[e] - numeric) < 2e-2 * (1 + std::fabs(numeric)), "group_norm grad element %zu: %g vs %g",
              e, grad_x[e], numeric);
      }
    }
}

// Residual FSQ against a scalar oracle: every fp32 step of vqp's chain evaluated in double and rounded
// to float on its own (exact for +, -, *, /), so no contraction can change a rounding; NaN rows.
static void test_residual_fsq() {
  std::mt19937 gen(4);
  std::normal_distribution<float> normal(0.0f, 0.8f);
  const std::vector<std::vector<int64_t>> level_lists = {{8, 5, 5, 5}, {7, 5, 5, 5, 5},
                                                         std::vector<int64_t>(16, 2)};
  for (const auto& levels : level_lists) {
    const int d = static_cast<int>(levels.size());
    for (const int num_q : {1, 4, 9}) {
      for (int64_t rows : {int64_t{1}, int64_t{7}, int64_t{257}, int64_t{3001}}) {
        std::vector<float> z(rows * d), z_hat(rows * d), scales(num_q * d);
        for (auto& v : z) v = normal(gen);
        if (rows > 5) z[5 * d + d - 1] = std::numeric_limits<float>::quiet_NaN();
        for (int l = 0; l < num_q; ++l)
          for (int c = 0; c < d; ++c) scales[l * d + c] = static_cast<float>(std::pow(double(levels[c]), -l));
        std::vector<int64_t> indices(rows * num_q);
        std::vector<uint8_t> count(rows * d);
        ResidualFsqParams p;
        residual_fsq_make_constants(levels.data(), d, num_q, p);
        p.rows = rows;
        const ResidualFsqArgs args{z.data(), scales.data(), z_hat.data(), indices.data(), count.data()};
        CHECK(run_residual_fsq_cpu(p, args).ok, "residual_fsq");
        for (int64_t r = 0; r < rows; ++r) {
          const bool nan_row = rows > 5 && r == 5;
          std::vector<int64_t> want_index(num_q, 0);
          for (int c = 0; c < d; ++c) {
            const float lm1 = static_cast<float>(levels[c] - 1);
            const float step = static_cast<float>(2.0 / double(lm1));
            float residual = z[r * d + c], sum = 0.0f;
            int passed = 0;
            for (int l = 0; l < num_q; ++l) {
              const float s = scales[l * d + c];
              const float b = static_cast<float>(double(residual) / double(s));
              passed += std::fabs(b) <= 1.0f;
              const float clamped = std::min(std::max(b, -1.0f), 1.0f);
              // vqp: (L - 1) * (clamp + 1) / 2 + 0.5, floored
              const float plus1 = static_cast<float>(double(clamped) + 1.0);
              const float scaled = static_cast<float>(double(lm1) * double(plus1));
              const float y = static_cast<float>(double(scaled) / 2.0 + 0.5);  // halving is exact
              const int64_t k = static_cast<int64_t>(std::floor(y));
              const float k_step = static_cast<float>(double(k) * double(step));
              const float code = static_cast<float>(double(k_step) - 1.0);
              const float q = static_cast<float>(double(code) * double(s));
              sum = l == 0 ? q : static_cast<float>(double(sum) + double(q));
              residual = static_cast<float>(double(residual) - double(q));
              want_index[l] += k * p.basis[c];
            }
            const float got = z_hat[r * d + c];
            CHECK(nan_row ? std::isnan(got) : got == sum, "residual_fsq value row %ld dim %d: %g vs %g",
                  long(r), c, got, sum);
            if (!nan_row) CHECK(count[r * d + c] == passed, "residual_fsq count row %ld dim %d", long(r), c);
          }
          for (int l = 0; l < num_q; ++l) {
            const int64_t want = nan_row ? -1 : want_index[l];
            CHECK(indices[r * num_q + l] == want, "residual_fsq index row %ld layer %d: %ld vs %ld",
                  long(r), l, long(indices[r * num_q + l]), long(want));
          }
        }
      }
    }
  }
}

int main() {
  test_half_conversions();
  test_group_norm();
  test_philox();
  test_sample_code();
  test_sampler_step();
  test_code_stats();
  test_ema_update();
  test_fsq();
  test_fsq_extreme_levels();
  test_residual_fsq();
  test_lfq_entropy();
  test_lfq_and_bsq_quantize();
  test_nearest_code();
  test_nearest_code_batched();
  test_nearest_code_rejects_bad_sizes();
  test_nearest_code_cuda_path();
  if (fl_test::failures()) std::fprintf(stderr, "%d check(s) failed\n", fl_test::failures());
  else std::printf("all CPU kernel checks passed\n");
  return fl_test::failures() ? 1 : 0;
}
