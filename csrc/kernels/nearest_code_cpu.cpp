// CPU nearest_code. See nearest_code.h for the math and the tie/NaN rules.
//
// Layout and blocking (BLIS-style, fp32 throughout):
//   * the codebook is converted once to fp32 and packed into panels of kNR codes,
//     panel[p][t][j] = c[p * kNR + j][t], so a panel row is kNV native SIMD vectors;
//   * a micro-tile holds kMR x kNR dot products in kMR * kNV vector registers while t
//     runs over D (one vector load per kVec codes, one broadcast per row, then FMAs);
//   * rows are processed in chunks of kRowsPerChunk (one OpenMP task each); within a
//     chunk the codebook is walked in blocks of about kCodeBlockBytes so a block stays in
//     L2 while every row of the chunk visits it;
//   * the epilogue is vectorised too: each SIMD lane j keeps a running (key, index)
//     minimum over codes j, j + kNR, j + 2 kNR, ... visited in increasing order, so a strict
//     comparison keeps the lowest index among equal keys; at the end of a chunk the lanes
//     are reduced with the total order (NaN first, then key, then index). The result is
//     therefore independent of thread count and schedule.
//   * the last, partial panel goes through a scalar epilogue over its valid codes only.
//
// Small D (d <= kSmallDMax) takes another path, vectorised over rows instead of codes: with
// few dims per dot product the epilogue above would cost as much as the FMAs. A block of
// rows is transposed into registers (x^T[t] holds dim t of kVec rows), each code is
// broadcast dim by dim, alpha is folded into the packed codes and beta seeds the
// accumulator, so a key costs d FMAs plus a compare and two blends shared by kVec rows,
// and the running minima never leave registers. d is rounded up to 4, 8 or 16 (zero dims
// add nothing to a dot product).
//
// The packing, the micro-tile and the SIMD types live in cpu_code_tiles.h (sample_code uses them too).
#include "nearest_code.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_code_tiles.h"
#include "dispatch.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastlatent {
namespace {

using namespace cpu_code_tiles;

// Row-vectorised path for d up to this: x^T of a row block takes at most half the registers.
constexpr int kSmallDMax = kVec == 16 ? 16 : 8;
constexpr int kSmallXRegs = kVec == 16 ? 16 : 8;

// (key, index) total order: NaN keys first, then smaller key, then smaller index.
inline bool better(float key, int64_t index, float best_key, int64_t best_index) {
  const bool key_nan = std::isnan(key), best_nan = std::isnan(best_key);
  if (key_nan || best_nan) return key_nan && (!best_nan || index < best_index);
  return key < best_key || (key == best_key && index < best_index);
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

// Codebook for the small-D path: [k][db] codes scaled by alpha, zero past d, and beta[k].
struct SmallDCodebook {
  AlignedFloats codes;
  AlignedFloats beta;
  int db = 0;
  bool all_finite = true;
};

inline int small_d_bucket(int64_t d) { return d <= 4 ? 4 : d <= 8 ? 8 : 16; }

template <typename T>
void pack_small_d_codebook(const NearestCodeParams& p, SmallDCodebook& out) {
  const T* code = static_cast<const T*>(p.codebook);
  const int64_t k = p.k, d = p.d;
  const int db = small_d_bucket(d);
  out.db = db;
  out.codes = aligned_floats(static_cast<size_t>(k) * db);
  out.beta = aligned_floats(static_cast<size_t>(k));
  bool all_finite = true;
  for (int64_t j = 0; j < k; ++j) {
    float values[16] = {};
    float norm2 = 0.0f;
    bool finite = true;
    for (int64_t t = 0; t < d; ++t) {
      values[t] = to_float(code[j * d + t]);
      norm2 += values[t] * values[t];
      finite = finite && std::isfinite(values[t]);
    }
    const float alpha = p.metric == Metric::kL2 ? -2.0f : -1.0f / std::max(std::sqrt(norm2), kCosineEps);
    for (int t = 0; t < db; ++t) out.codes[j * db + t] = alpha * values[t];
    out.beta[j] = !finite ? std::numeric_limits<float>::quiet_NaN() : p.metric == Metric::kL2 ? norm2 : 0.0f;
    all_finite = all_finite && finite;
  }
  out.all_finite = all_finite;
}

template <int DB>
constexpr int small_d_row_vectors() {
  return kSmallXRegs / DB > 0 ? kSmallXRegs / DB : 1;
}

// Nearest code for small_d_row_vectors<DB>() * kVec rows whose transposed values are
// xt[t * rows + i] (zero-padded to DB dims). Writes the winning index of each row.
template <int DB, bool CheckNaN>
void small_d_block(const float* __restrict xt, const SmallDCodebook& cb, int64_t k,
                   int32_t* __restrict out_index) {
  constexpr int kNVR = small_d_row_vectors<DB>();
  constexpr int kRows = kNVR * kVec;
  VecF xv[DB][kNVR];
  for (int t = 0; t < DB; ++t)
    for (int v = 0; v < kNVR; ++v) xv[t][v] = load(xt + t * kRows + v * kVec);
  VecF best[kNVR];
  VecI best_index[kNVR];
  for (int v = 0; v < kNVR; ++v) {
    best[v] = VecF{} + std::numeric_limits<float>::infinity();
    best_index[v] = VecI{};
  }
  const float* codes = cb.codes.get();
  const float* beta = cb.beta.get();
  for (int64_t j = 0; j < k; ++j) {
    VecF acc[kNVR];
    for (int v = 0; v < kNVR; ++v) acc[v] = VecF{} + beta[j];
    for (int t = 0; t < DB; ++t) {
      const float c = codes[j * DB + t];
      for (int v = 0; v < kNVR; ++v) acc[v] += xv[t][v] * c;
    }
    const VecI code_index = VecI{} + static_cast<int32_t>(j);
    for (int v = 0; v < kNVR; ++v) {
      VecI take;
      if constexpr (CheckNaN) {
        take = (acc[v] < best[v]) | ((acc[v] != acc[v]) & (best[v] == best[v]));
      } else {
        take = acc[v] < best[v];
      }
      best[v] = take ? acc[v] : best[v];
      best_index[v] = take ? code_index : best_index[v];
    }
  }
  for (int v = 0; v < kNVR; ++v)
    for (int i = 0; i < kVec; ++i) out_index[v * kVec + i] = best_index[v][i];
}

template <bool CheckNaN>
void small_d_rows(const float* xf, int64_t rows, int64_t d, const SmallDCodebook& cb, int64_t k,
                  std::vector<float>& xt_buffer, int64_t* out_index) {
  auto run = [&](auto db_tag) {
    constexpr int DB = decltype(db_tag)::value;
    constexpr int kRows = small_d_row_vectors<DB>() * kVec;
    xt_buffer.assign(static_cast<size_t>(DB) * kRows, 0.0f);
    int32_t index[kRows];
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int64_t count = std::min<int64_t>(kRows, rows - r0);
      std::fill(xt_buffer.begin(), xt_buffer.end(), 0.0f);
      for (int64_t i = 0; i < count; ++i)
        for (int64_t t = 0; t < d; ++t) xt_buffer[t * kRows + i] = xf[(r0 + i) * d + t];
      small_d_block<DB, CheckNaN>(xt_buffer.data(), cb, k, index);
      for (int64_t i = 0; i < count; ++i) out_index[r0 + i] = index[i];
    }
  };
  switch (cb.db) {
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 8: run(std::integral_constant<int, 8>{}); break;
    default:
      if constexpr (kSmallDMax >= 16) run(std::integral_constant<int, 16>{});
      break;
  }
}

// Per-chunk running minima: one (key, index) vector pair per row and panel vector.
struct LaneMinima {
  VecF key[kRowsPerChunk][kNV];
  VecI index[kRowsPerChunk][kNV];
};

// Fold one micro-tile into the lane minima. CheckNaN: some key may be NaN (a non-finite
// code); otherwise the plain comparison is exact and cheaper.
template <bool CheckNaN>
inline void fold_tile(const VecF (&acc)[kMR][kNV], const float* alpha, const float* beta,
                      int32_t first_code, LaneMinima& m, int64_t r0, int valid_rows) {
  VecI lane_index;
  for (int j = 0; j < kVec; ++j) lane_index[j] = first_code + j;
  for (int v = 0; v < kNV; ++v) {
    const VecF a = load(alpha + v * kVec), b = load(beta + v * kVec);
    const VecI idx = lane_index + v * kVec;
    for (int r = 0; r < valid_rows; ++r) {
      const VecF key = b + a * acc[r][v];
      VecF& best = m.key[r0 + r][v];
      VecI take;
      if constexpr (CheckNaN) {
        take = (key < best) | ((key != key) & (best == best));
      } else {
        take = key < best;
      }
      best = take ? key : best;
      m.index[r0 + r][v] = take ? idx : m.index[r0 + r][v];
    }
  }
}

// Large-D search: best index of each of `rows` rows (<= kRowsPerChunk) into out_index.
template <bool CheckNaN>
void large_d_rows(const float* xf, int64_t rows, int64_t d, int64_t k, const PackedCodebook& packed,
                  LaneMinima& minima, int64_t* out_index) {
  for (int64_t r = 0; r < rows; ++r)
    for (int v = 0; v < kNV; ++v) {
      minima.key[r][v] = VecF{} + std::numeric_limits<float>::infinity();
      minima.index[r][v] = VecI{};
    }
  float tail_key[kRowsPerChunk];
  int64_t tail_index[kRowsPerChunk];
  std::fill(tail_key, tail_key + rows, std::numeric_limits<float>::infinity());
  std::fill(tail_index, tail_index + rows, int64_t{0});

  const int64_t full_panels = k / kNR;  // panels whose kNR codes are all valid
  const int64_t panel_bytes = d * kNR * static_cast<int64_t>(sizeof(float));
  const int64_t panels_per_block = std::max<int64_t>(1, kCodeBlockBytes / panel_bytes);

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
        const float* alpha = packed.alpha.get() + first;
        const float* beta = packed.beta.get() + first;
        if (panel < full_panels) {
          fold_tile<CheckNaN>(acc, alpha, beta, static_cast<int32_t>(first), minima, r0, valid_rows);
          continue;
        }
        const int valid_codes = static_cast<int>(k - first);
        for (int r = 0; r < valid_rows; ++r)
          for (int j = 0; j < valid_codes; ++j) {
            const float key = beta[j] + alpha[j] * acc[r][j / kVec][j % kVec];
            if (better(key, first + j, tail_key[r0 + r], tail_index[r0 + r])) {
              tail_key[r0 + r] = key;
              tail_index[r0 + r] = first + j;
            }
          }
      }
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    float best_key = tail_key[r];
    int64_t best_index = tail_index[r];
    if (full_panels > 0) {
      for (int v = 0; v < kNV; ++v)
        for (int j = 0; j < kVec; ++j)
          if (better(minima.key[r][v][j], minima.index[r][v][j], best_key, best_index)) {
            best_key = minima.key[r][v][j];
            best_index = minima.index[r][v][j];
          }
    }
    out_index[r] = best_index;
  }
}

// Apply the non-finite-row rule and write indices and exact distances of a chunk.
template <typename T>
void finish_rows(const NearestCodeParams& p, const float* xf, int64_t row0, int64_t rows,
                 const int64_t* best_index) {
  const int64_t d = p.d;
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
  const bool small_d = p.d <= kSmallDMax;
  PackedCodebook packed;
  SmallDCodebook small;
  if (small_d) {
    pack_small_d_codebook<T>(p, small);
  } else {
    pack_codebook<T>(p, packed);
  }
  const bool check_nan = small_d ? !small.all_finite : !packed.all_finite;
  const int64_t num_chunks = (p.n + kRowsPerChunk - 1) / kRowsPerChunk;
#pragma omp parallel if (num_chunks > 1)
  {
    std::vector<float> x_buffer, xt_buffer;
    std::unique_ptr<LaneMinima> minima(small_d ? nullptr : new LaneMinima);
    int64_t best_index[kRowsPerChunk];
#pragma omp for schedule(dynamic, 1)
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const int64_t row0 = chunk * kRowsPerChunk;
      const int64_t rows = std::min(kRowsPerChunk, p.n - row0);
      const float* xf = rows_as_float<T>(p.x, p.d, row0, rows, x_buffer);
      FL_BOOL_SWITCH(check_nan, kCheckNaN, [&] {
        if (small_d) {
          small_d_rows<kCheckNaN>(xf, rows, p.d, small, p.k, xt_buffer, best_index);
        } else {
          large_d_rows<kCheckNaN>(xf, rows, p.d, p.k, packed, *minima, best_index);
        }
      });
      finish_rows<T>(p, xf, row0, rows, best_index);
    }
  }
  return Status::Ok();
}

}  // namespace

Status run_nearest_code_cpu(const NearestCodeParams& params) {
  if (params.k < 1 || params.d < 1 || params.n < 0)
    return Status::Error("nearest_code: need n >= 0, k >= 1, d >= 1");
  if (params.k > INT32_MAX - 2 * kNR) return Status::Error("nearest_code: k must be below 2^31");
  if (params.batch < 0) return Status::Error("nearest_code: need batch >= 0");
  if (params.n == 0 || params.batch == 0) return Status::Ok();
  // Batched searches run one after another, each parallel over its rows: every search packs its
  // own codebook, and a head's rows are many enough to fill the threads in the cases that matter.
  const size_t elem = params.dtype == DType::kFloat64 ? 8 : params.dtype == DType::kFloat32 ? 4 : 2;
  for (int64_t b = 0; b < params.batch; ++b) {
    NearestCodeParams one = params;
    one.batch = 1;
    one.x = static_cast<const char*>(params.x) + static_cast<size_t>(b * params.n * params.d) * elem;
    one.codebook = static_cast<const char*>(params.codebook) + static_cast<size_t>(b * params.k * params.d) * elem;
    one.indices = params.indices + b * params.n;
    one.distances = params.distances + b * params.n;
    const Status status = FL_DTYPE_SWITCH(params.dtype, scalar_t,
                                          Status::Error("nearest_code: unsupported dtype"),
                                          [&] { return run_typed<scalar_t>(one); });
    if (!status.ok) return status;
  }
  return Status::Ok();
}

}  // namespace fastlatent
