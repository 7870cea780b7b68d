// CPU sample_code. See sample_code.h for the math, the noise stream and the tie/NaN rules.
//
// The dot products come from nearest_code's packed panels and micro-tile (cpu_code_tiles.h):
// rows in chunks of kRowsPerChunk (one OpenMP task each), the codebook in blocks of about
// kCodeBlockBytes that stay in L2 while every row of the chunk visits them. The epilogue: per row and
// panel of kNR codes the logits, then, only when some logit / T + kGumbelMax could beat the row's
// running maximum, the panel's noise in one vectorised block. Every row visits its codes in increasing
// order, so a strict
// comparison keeps the lowest index among equal keys and the result does not depend on the
// thread count or schedule.
#include "sample_code.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_code_tiles.h"
#include "dispatch.h"

namespace fastlatent {
namespace {

using namespace cpu_code_tiles;

// Running maximum of one row: the first NaN key wins for good (lowest index), else the largest key.
struct RowBest {
  float key = -std::numeric_limits<float>::infinity();
  int64_t index = 0;
  bool nan = false;
};

inline void offer(RowBest& best, float scaled_logit, float noise, int64_t code) {
  if (best.nan) return;
  if (std::isnan(scaled_logit)) {
    best = RowBest{best.key, code, true};
    return;
  }
  const float key = scaled_logit + noise;
  if (key > best.key) {
    best.key = key;
    best.index = code;
  }
}

// Noise of the stream elements [e0, e0 + count), count <= kNR: the Philox words of whole groups first,
// then the logarithms in one loop that the compiler vectorises (the same IEEE operations as
// gumbel_noise, so the same bits; about 4x faster than one element at a time here).
void noise_block(const SampleCodeParams& p, uint64_t e0, int count, float* out) {
  constexpr int kMaxWords = kNR + 8;
  alignas(64) uint32_t words[kMaxWords];
  alignas(64) float noise[kMaxWords];
  const uint64_t g0 = e0 >> 2;
  const int groups = static_cast<int>(((e0 + static_cast<uint64_t>(count) - 1) >> 2) - g0 + 1);
  for (int g = 0; g < groups; ++g) {
    const philox::Words w = gumbel_words(p.seed, p.offset, g0 + static_cast<uint64_t>(g));
    for (int j = 0; j < 4; ++j) words[4 * g + j] = w.w[j];
  }
  for (int i = 0; i < 4 * groups; ++i) noise[i] = gumbel_from_word(words[i]);
  const int skip = static_cast<int>(e0 & 3);
  for (int i = 0; i < count; ++i) out[i] = noise[skip + i];
}

// Rows [row0, row0 + rows) of search `b`, whose fp32 values are xf.
void sample_rows(const SampleCodeParams& p, int64_t b, const PackedCodebook& packed, const float* xf,
                 int64_t row0, int64_t rows, int64_t* out) {
  const int64_t d = p.d, k = p.k;
  float x_norm2[kRowsPerChunk];
  bool finite[kRowsPerChunk];
  RowBest best[kRowsPerChunk];
  for (int64_t r = 0; r < rows; ++r) {
    float sum = 0.0f;
    bool ok = true;
    for (int64_t t = 0; t < d; ++t) {
      sum += xf[r * d + t] * xf[r * d + t];
      ok = ok && std::isfinite(xf[r * d + t]);
    }
    x_norm2[r] = sum;
    finite[r] = ok;
  }
  const int64_t panel_bytes = d * kNR * static_cast<int64_t>(sizeof(float));
  const int64_t panels_per_block = std::max<int64_t>(1, kCodeBlockBytes / panel_bytes);
  const float inv_t = p.inv_temperature;
  VecF acc[kMR][kNV];
  for (int64_t block0 = 0; block0 < packed.num_panels; block0 += panels_per_block) {
    const int64_t block1 = std::min(packed.num_panels, block0 + panels_per_block);
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const int valid_rows = static_cast<int>(std::min<int64_t>(kMR, rows - r0));
      const float* xrows[kMR];
      // Rows past the end repeat the last valid row; their results are discarded.
      for (int r = 0; r < kMR; ++r) xrows[r] = xf + std::min<int64_t>(r0 + r, rows - 1) * d;
      for (int64_t panel = block0; panel < block1; ++panel) {
        micro_tile(xrows, packed.panels.get() + panel * d * kNR, d, acc);
        const int64_t first = panel * kNR;
        const int valid_codes = static_cast<int>(std::min<int64_t>(kNR, k - first));
        const float* alpha = packed.alpha.get() + first;
        const float* beta = packed.beta.get() + first;
        for (int r = 0; r < valid_rows; ++r) {
          const int64_t row = r0 + r;
          RowBest& row_best = best[row];
          if (row_best.nan) continue;
          float scaled[kNR], noise[kNR];
          bool may_win = false;  // NaN logits too (the comparison is false for them)
          for (int j = 0; j < valid_codes; ++j) {
            const float key = beta[j] + alpha[j] * acc[r][j / kVec][j % kVec];
            scaled[j] = sample_code_logit(key, x_norm2[row], p.metric) * inv_t;
            may_win = may_win || !(scaled[j] + kGumbelMax <= row_best.key);
          }
          if (!may_win) continue;  // no code of this panel can beat the row's maximum: no noise (exact)
          const uint64_t row_element = static_cast<uint64_t>((b * p.n + row0 + row) * k);
          noise_block(p, row_element + static_cast<uint64_t>(first), valid_codes, noise);
          for (int j = 0; j < valid_codes; ++j) offer(row_best, scaled[j], noise[j], first + j);
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) out[r] = finite[r] ? best[r].index : 0;  // every key of the row is NaN
}

template <typename T>
void run_search(const SampleCodeParams& p, int64_t b) {
  const size_t elem = sizeof(T);
  NearestCodeParams codes;  // the packing reads only the codebook, k, d and the metric
  codes.codebook = static_cast<const char*>(p.codebook) + static_cast<size_t>(b * p.k * p.d) * elem;
  codes.k = p.k;
  codes.d = p.d;
  codes.metric = p.metric;
  PackedCodebook packed;
  pack_codebook<T>(codes, packed);
  const void* x = static_cast<const char*>(p.x) + static_cast<size_t>(b * p.n * p.d) * elem;
  const int64_t num_chunks = (p.n + kRowsPerChunk - 1) / kRowsPerChunk;
#pragma omp parallel if (num_chunks > 1)
  {
    std::vector<float> x_buffer;
#pragma omp for schedule(dynamic, 1)
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const int64_t row0 = chunk * kRowsPerChunk;
      const int64_t rows = std::min(kRowsPerChunk, p.n - row0);
      const float* xf = rows_as_float<T>(x, p.d, row0, rows, x_buffer);
      sample_rows(p, b, packed, xf, row0, rows, p.indices + b * p.n + row0);
    }
  }
}

}  // namespace

Status run_sample_code_cpu(const SampleCodeParams& params) {
  if (params.k < 1 || params.d < 1 || params.n < 0 || params.batch < 0)
    return Status::Error("sample_code: need n >= 0, k >= 1, d >= 1, batch >= 0");
  if (params.k > INT32_MAX - 2 * kNR) return Status::Error("sample_code: k must be below 2^31");
  if (!(params.inv_temperature > 0.0f) || !std::isfinite(params.inv_temperature))
    return Status::Error("sample_code: need a finite inverse temperature > 0");
  if (params.n == 0 || params.batch == 0) return Status::Ok();
  for (int64_t b = 0; b < params.batch; ++b) {
    const Status status = FL_DTYPE_SWITCH(params.dtype, scalar_t, Status::Error("sample_code: unsupported dtype"), [&] {
      run_search<scalar_t>(params, b);
      return Status::Ok();
    });
    if (!status.ok) return status;
  }
  return Status::Ok();
}

}  // namespace fastlatent
