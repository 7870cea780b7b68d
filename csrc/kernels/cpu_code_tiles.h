// The CPU distance tiles shared by nearest_code and sample_code: the codebook packed once into fp32
// panels with per-code (alpha, beta), and the register-blocked micro-tile of dot products
// (see nearest_code_cpu.cpp for the blocking). Both searches then differ only in their epilogue:
// nearest_code keeps the smallest key beta + alpha <x, c>, sample_code turns the key into a
// logit, adds Gumbel noise and keeps the largest.
//
// Vectors are GCC/Clang vector extensions sized to the widest SIMD the build targets
// (-march): AVX-512 16 floats, AVX2 8, otherwise 4. Tile sizes per target are chosen to
// use about half the vector registers for accumulators.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "common.h"
#include "nearest_code.h"

namespace fastlatent {
namespace cpu_code_tiles {

#if defined(__AVX512F__)
constexpr int kVec = 16;
constexpr int kMR = 8;
#elif defined(__AVX2__) || defined(__AVX__)
constexpr int kVec = 8;
constexpr int kMR = 6;
#else
constexpr int kVec = 4;
constexpr int kMR = 4;
#endif
constexpr int kNV = 2;  // vectors per panel row
constexpr int kNR = kVec * kNV;
constexpr int64_t kRowsPerChunk = kMR * 16;
constexpr int64_t kCodeBlockBytes = 128 * 1024;
typedef float VecF __attribute__((vector_size(kVec * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kVec * sizeof(int32_t))));

inline VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using AlignedFloats = std::unique_ptr<float[], FreeDeleter>;

inline AlignedFloats aligned_floats(size_t count) {
  const size_t bytes = ((count * sizeof(float) + 63) / 64) * 64;
  return AlignedFloats(static_cast<float*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64)));
}

struct PackedCodebook {
  AlignedFloats panels;  // [num_panels][d][kNR], zero past k
  AlignedFloats alpha;   // [num_panels * kNR]
  AlignedFloats beta;    // [num_panels * kNR]
  int64_t num_panels = 0;
  bool all_finite = true;
};

template <typename T>
void pack_codebook(const NearestCodeParams& p, PackedCodebook& out) {
  const T* code = static_cast<const T*>(p.codebook);
  const int64_t k = p.k, d = p.d;
  out.num_panels = (k + kNR - 1) / kNR;
  const size_t padded = static_cast<size_t>(out.num_panels) * kNR;
  out.panels = aligned_floats(padded * d);
  out.alpha = aligned_floats(padded);
  out.beta = aligned_floats(padded);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  bool all_finite = true;

#pragma omp parallel for schedule(static) reduction(&& : all_finite) if (k * d > 32768)
  for (int64_t panel = 0; panel < out.num_panels; ++panel) {
    float* dst = out.panels.get() + panel * d * kNR;
    const int64_t first = panel * kNR;
    for (int64_t j = 0; j < kNR; ++j) {
      if (first + j >= k) {
        for (int64_t t = 0; t < d; ++t) dst[t * kNR + j] = 0.0f;
        out.alpha[first + j] = 0.0f;
        out.beta[first + j] = std::numeric_limits<float>::infinity();
        continue;
      }
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
      all_finite = all_finite && finite;
    }
  }
  out.all_finite = all_finite;
}

// acc[r][v] = <xrows[r], codes (panel, v * kVec .. v * kVec + kVec - 1)> over t in [0, d).
// Kept out of line (one copy for every dtype) and accumulating into a local tile: inlined
// into the fp16 chunk loop, or accumulating through a reference, gcc 12 kept the tile in
// memory and ran 2.4-3x slower.
#if defined(__GNUC__)
__attribute__((noinline))
#endif
inline void micro_tile(const float* const* xrows, const float* __restrict panel, int64_t d,
                VecF (&out)[kMR][kNV]) {
  VecF acc[kMR][kNV];
  for (int r = 0; r < kMR; ++r)
    for (int v = 0; v < kNV; ++v) acc[r][v] = VecF{} ;
  for (int64_t t = 0; t < d; ++t) {
    VecF b[kNV];
    for (int v = 0; v < kNV; ++v) b[v] = load(panel + t * kNR + v * kVec);
    for (int r = 0; r < kMR; ++r) {
      const float a = xrows[r][t];
      for (int v = 0; v < kNV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < kMR; ++r)
    for (int v = 0; v < kNV; ++v) out[r][v] = acc[r][v];
}

// fp32 view of a chunk's rows: the input itself, or a converted copy in `buffer`.
template <typename T>
const float* rows_as_float(const void* x_base, int64_t d, int64_t row0, int64_t rows, std::vector<float>& buffer) {
  const T* x = static_cast<const T*>(x_base) + row0 * d;
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    buffer.resize(static_cast<size_t>(rows) * d);
    for (int64_t i = 0; i < rows * d; ++i) buffer[i] = to_float(x[i]);
    return buffer.data();
  }
}

}  // namespace cpu_code_tiles
}  // namespace fastlatent
