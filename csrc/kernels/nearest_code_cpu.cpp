// CPU nearest_code. See nearest_code.h for the math and the tie/NaN rules.
//
// Layout and blocking (BLIS-style, fp32 throughout):
//   * the codebook is converted once to fp32 and packed into panels of kNR codes,
//     panel[p][t][j] = c[p * kNR + j][t], so the inner loop over j is a contiguous
//     vector load that the compiler turns into SIMD FMAs;
//   * a micro-tile holds kMR x kNR dot products in registers while t runs over D;
//   * rows are processed in chunks of kRowsPerChunk (one OpenMP task each); within a
//     chunk the codebook is walked in blocks of about kCodeBlockBytes so a block stays in
//     L2 while every row of the chunk visits it;
//   * the epilogue turns dot products into keys (beta + alpha * dot) and folds them into
//     the running per-row minimum; codes are visited in increasing order, so a strict
//     comparison leaves ties at the lowest index whatever the thread count.
#include "nearest_code.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dispatch.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastlatent {
namespace {

constexpr int kMR = 4;
constexpr int kNR = 16;
constexpr int64_t kRowsPerChunk = 64;
constexpr int64_t kCodeBlockBytes = 128 * 1024;

struct PackedCodebook {
  std::vector<float> panels;  // [num_panels][d][kNR]
  std::vector<float> alpha;   // [k]
  std::vector<float> beta;    // [k]
  int64_t num_panels = 0;
};

template <typename T>
void pack_codebook(const NearestCodeParams& p, PackedCodebook& out) {
  const T* code = static_cast<const T*>(p.codebook);
  const int64_t k = p.k, d = p.d;
  out.num_panels = (k + kNR - 1) / kNR;
  out.panels.assign(static_cast<size_t>(out.num_panels) * d * kNR, 0.0f);
  out.alpha.resize(k);
  out.beta.resize(k);
  const float nan = std::numeric_limits<float>::quiet_NaN();

#pragma omp parallel for schedule(static) if (k * d > 32768)
  for (int64_t panel = 0; panel < out.num_panels; ++panel) {
    float* dst = out.panels.data() + panel * d * kNR;
    const int64_t first = panel * kNR;
    const int64_t count = std::min<int64_t>(kNR, k - first);
    for (int64_t j = 0; j < count; ++j) {
      const T* src = code + (first + j) * d;
      float norm2 = 0.0f;
      bool finite = true;
      for (int64_t t = 0; t < d; ++t) {
        const float v = to_float(src[t]);
        dst[t * kNR + j] = v;
        norm2 += v * v;
        finite = finite && std::isfinite(v);
      }
      float alpha, beta;
      if (p.metric == Metric::kL2) {
        alpha = -2.0f;
        beta = norm2;
      } else {
        alpha = -1.0f / std::max(std::sqrt(norm2), kCosineEps);
        beta = 0.0f;
      }
      out.alpha[first + j] = alpha;
      out.beta[first + j] = finite ? beta : nan;  // NaN key: this code wins (header rule)
    }
  }
}

// acc[r][j] = <xrows[r], code (panel, j)> over t in [0, d).
// Kept out of line (one copy for every dtype) and accumulating into a local tile: inlined
// into the fp16 chunk loop, or accumulating through the reference, gcc 12 kept the tile in
// memory and ran 2.4-3x slower (measured at N=8192, D=64, K=1024).
#if defined(__GNUC__)
__attribute__((noinline))
#endif
void micro_tile(const float* const* xrows, const float* __restrict panel, int64_t d,
                float (&out)[kMR][kNR]) {
  float acc[kMR][kNR] = {};
  for (int64_t t = 0; t < d; ++t) {
    const float* b = panel + t * kNR;
    for (int r = 0; r < kMR; ++r) {
      const float a = xrows[r][t];
      for (int j = 0; j < kNR; ++j) acc[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < kMR; ++r)
    for (int j = 0; j < kNR; ++j) out[r][j] = acc[r][j];
}

inline bool key_wins(float key, float best) {
  return key < best || (std::isnan(key) && !std::isnan(best));
}

template <typename T>
float exact_distance(const float* x_row, const T* code_row, int64_t d, Metric metric) {
  if (metric == Metric::kL2) {
    float sum = 0.0f;
    for (int64_t t = 0; t < d; ++t) {
      const float diff = x_row[t] - to_float(code_row[t]);
      sum += diff * diff;
    }
    return sum;
  }
  float dot = 0.0f, xx = 0.0f, cc = 0.0f;
  for (int64_t t = 0; t < d; ++t) {
    const float c = to_float(code_row[t]);
    dot += x_row[t] * c;
    xx += x_row[t] * x_row[t];
    cc += c * c;
  }
  return 1.0f - dot / (std::max(std::sqrt(xx), kCosineEps) * std::max(std::sqrt(cc), kCosineEps));
}

template <typename T>
void nearest_code_chunk(const NearestCodeParams& p, const PackedCodebook& packed, int64_t row0,
                        int64_t rows, std::vector<float>& x_buffer) {
  const int64_t d = p.d, k = p.k;
  const T* x = static_cast<const T*>(p.x) + row0 * d;

  // fp32 view of this chunk's rows: the input itself, or a converted copy.
  const float* xf;
  if constexpr (std::is_same_v<T, float>) {
    xf = x;
  } else {
    x_buffer.resize(static_cast<size_t>(rows) * d);
    for (int64_t i = 0; i < rows * d; ++i) x_buffer[i] = to_float(x[i]);
    xf = x_buffer.data();
  }

  float best_key[kRowsPerChunk];
  int64_t best_index[kRowsPerChunk];
  std::fill(best_key, best_key + rows, std::numeric_limits<float>::infinity());
  std::fill(best_index, best_index + rows, int64_t{0});

  const int64_t panel_bytes = d * kNR * static_cast<int64_t>(sizeof(float));
  const int64_t panels_per_block = std::max<int64_t>(1, kCodeBlockBytes / panel_bytes);

  float acc[kMR][kNR];
  for (int64_t block0 = 0; block0 < packed.num_panels; block0 += panels_per_block) {
    const int64_t block1 = std::min(packed.num_panels, block0 + panels_per_block);
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const int valid_rows = static_cast<int>(std::min<int64_t>(kMR, rows - r0));
      const float* xrows[kMR];
      // Rows past the end repeat the last valid row; their results are discarded.
      for (int r = 0; r < kMR; ++r) xrows[r] = xf + std::min<int64_t>(r0 + r, rows - 1) * d;

      for (int64_t panel = block0; panel < block1; ++panel) {
        micro_tile(xrows, packed.panels.data() + panel * d * kNR, d, acc);
        const int64_t first = panel * kNR;
        const int valid_codes = static_cast<int>(std::min<int64_t>(kNR, k - first));
        const float* alpha = packed.alpha.data() + first;
        const float* beta = packed.beta.data() + first;
        for (int r = 0; r < valid_rows; ++r) {
          float bk = best_key[r0 + r];
          int64_t bi = best_index[r0 + r];
          for (int j = 0; j < valid_codes; ++j) {
            const float key = beta[j] + alpha[j] * acc[r][j];
            if (key_wins(key, bk)) {
              bk = key;
              bi = first + j;
            }
          }
          best_key[r0 + r] = bk;
          best_index[r0 + r] = bi;
        }
      }
    }
  }

  const T* code = static_cast<const T*>(p.codebook);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x_row = xf + r * d;
    bool finite = true;
    for (int64_t t = 0; t < d; ++t) finite = finite && std::isfinite(x_row[t]);
    const int64_t index = finite ? best_index[r] : 0;  // every key of the row is NaN
    p.indices[row0 + r] = index;
    p.distances[row0 + r] = exact_distance(x_row, code + index * d, d, p.metric);
  }
}

template <typename T>
Status run_typed(const NearestCodeParams& p) {
  PackedCodebook packed;
  pack_codebook<T>(p, packed);
  const int64_t num_chunks = (p.n + kRowsPerChunk - 1) / kRowsPerChunk;
#pragma omp parallel if (num_chunks > 1)
  {
    std::vector<float> x_buffer;
#pragma omp for schedule(dynamic, 1)
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const int64_t row0 = chunk * kRowsPerChunk;
      nearest_code_chunk<T>(p, packed, row0, std::min(kRowsPerChunk, p.n - row0), x_buffer);
    }
  }
  return Status::Ok();
}

}  // namespace

Status run_nearest_code_cpu(const NearestCodeParams& params) {
  if (params.k < 1 || params.d < 1 || params.n < 0)
    return Status::Error("nearest_code: need n >= 0, k >= 1, d >= 1");
  if (params.n == 0) return Status::Ok();
  return FL_DTYPE_SWITCH(params.dtype, scalar_t,
                         Status::Error("nearest_code: unsupported dtype"),
                         [&] { return run_typed<scalar_t>(params); });
}

}  // namespace fastlatent
