// CPU FSQ: quantize, its backward and indices_to_codes. See fsq.h for the math and NaN rules.
//
// Rows are processed in chunks of kRowsPerChunk. The per-channel constants are tiled once per
// call to the length of a chunk (chunk j-th element has channel j % d), so the hot loop is a
// flat loop over chunk elements with no modulo and no libm call: gcc vectorises it (AVX2:
// 8 lanes). A second, per-row loop forms the int64 index and re-evaluates in fp64 the rare
// elements flagged as near a rounding boundary (or NaN).
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "dispatch.h"
#include "fsq.h"

namespace fastlatent {

void fsq_make_constants(const int64_t* levels, int d, bool preserve_symmetry, FsqParams& p) {
  p.d = d;
  p.preserve_symmetry = preserve_symmetry;
  int64_t basis = 1;
  for (int i = 0; i < d; ++i) {
    FsqChannel& c = p.channel[i];
    const int64_t L = levels[i];
    c.levels = L;
    c.half_width = L / 2;
    c.basis = basis;
    basis *= L;
    if (preserve_symmetry) {
      c.half_l = static_cast<double>(L - 1) / 2.0;
      c.shift = 0.0;
      c.offset = 0.0;
      c.grad_scale = 1.0;
      c.inv_scale_f = static_cast<float>(L - 1);  // code = (2k - (L - 1)) / (L - 1)
    } else {
      c.half_l = static_cast<double>(L - 1) * (1.0 + kFsqBoundEps) / 2.0;
      c.offset = (L % 2 == 0) ? 0.5 : 0.0;
      c.shift = std::atanh(c.offset / c.half_l);
      c.grad_scale = c.half_l / static_cast<double>(L / 2);
      c.inv_scale_f = static_cast<float>(L / 2);  // code = q / (L / 2)
    }
    c.shift_f = static_cast<float>(c.shift);
    c.half_l_f = static_cast<float>(c.half_l);
    c.offset_f = static_cast<float>(c.offset);
    c.grad_scale_f = static_cast<float>(c.grad_scale);
    c.tol_f = static_cast<float>(kFsqBoundaryTol * (c.half_l + 1.0));
  }
  p.codebook_size = basis;
}

namespace {

constexpr int64_t kRowsPerChunk = 256;

// fp64 evaluation of one element, the ground truth the fp32 path must agree with.
// Returns the level k in [0, L); the value is formed from k by code_value().
inline int64_t level_fp64(const FsqChannel& c, bool symmetric, double z) {
  if (symmetric) {
    const double y = static_cast<double>(c.levels - 1) * (std::tanh(z) + 1.0) / 2.0 + 0.5;
    return std::clamp<int64_t>(static_cast<int64_t>(std::floor(y)), 0, c.levels - 1);
  }
  const double y = std::tanh(z + c.shift) * c.half_l - c.offset;
  const int64_t q = static_cast<int64_t>(std::nearbyint(y));
  return std::clamp<int64_t>(q + c.half_width, 0, c.levels - 1);
}

template <typename M>
inline M code_value(const FsqChannel& c, bool symmetric, int64_t k) {
  if (symmetric) return static_cast<M>(2 * k - (c.levels - 1)) / static_cast<M>(c.levels - 1);
  return static_cast<M>(k - c.half_width) / static_cast<M>(c.half_width);
}

// Channel constants repeated over a chunk, in the math type M.
template <typename M>
struct Tiled {
  std::vector<M> a, b, c, lo, hi, den, tol, bias, grad;
  Tiled(const FsqParams& p, int64_t n) {
    for (auto* v : {&a, &b, &c, &lo, &hi, &den, &tol, &bias, &grad}) v->resize(n);
    for (int64_t j = 0; j < n; ++j) {
      const FsqChannel& ch = p.channel[j % p.d];
      const bool sym = p.preserve_symmetry;
      a[j] = sym ? M(0) : static_cast<M>(ch.shift);
      b[j] = static_cast<M>(ch.half_l);
      c[j] = sym ? M(0.5) : static_cast<M>(-ch.offset);
      // q is clamped to [lo, hi] (only NaN and fp32 slop at the extremes ever need it)
      lo[j] = sym ? M(0) : static_cast<M>(-ch.half_width);
      hi[j] = sym ? static_cast<M>(ch.levels - 1) : static_cast<M>(ch.levels - 1 - ch.half_width);
      // value = (q * mul + bias) / den: symmetric 2k - (L - 1), default q
      den[j] = sym ? static_cast<M>(ch.levels - 1) : static_cast<M>(ch.half_width);
      bias[j] = sym ? static_cast<M>(-(ch.levels - 1)) : M(0);
      tol[j] = std::is_same_v<M, float> ? static_cast<M>(ch.tol_f) : M(0);
      grad[j] = static_cast<M>(ch.grad_scale);
    }
  }
};

// The hot loops work on arrays of the math type only (fp16/bf16 are converted around them):
// instantiated inside the T-templated chunk function, gcc 12 left them scalar (about 20 ns
// per element); as plain array loops they vectorise. Round half to even by the 1.5 * 2^23
// trick (exact for |y| < 2^22; larger levels have tol >= 0.5, so every element takes the
// fp64 path anyway).
template <typename M>
#if defined(__GNUC__)
__attribute__((noinline))
#endif
void hot_default(const M* __restrict z, const M* __restrict A, const M* __restrict B, const M* __restrict C,
                 const M* __restrict lo, const M* __restrict hi, const M* __restrict den, const M* __restrict tol,
                 M* __restrict q, uint8_t* __restrict fl, M* __restrict out, int64_t n) {
  constexpr M kMagic = std::is_same_v<M, float> ? M(12582912.0f) : M(6755399441055744.0);
  for (int64_t j = 0; j < n; ++j) {
    const M zv = z[j];
    const M y = cpu_math::tanh_fast(zv + A[j]) * B[j] + C[j];
    M r = (y + kMagic) - kMagic;
    const M dist = std::fabs(y - r);
    r = std::min(std::max(r, lo[j]), hi[j]);
    q[j] = r;
    fl[j] = static_cast<uint8_t>((dist > M(0.5) - tol[j]) | (zv != zv));
    out[j] = r / den[j];
  }
}

template <typename M>
#if defined(__GNUC__)
__attribute__((noinline))
#endif
void hot_symmetric(const M* __restrict z, const M* __restrict B, const M* __restrict lo, const M* __restrict hi,
                   const M* __restrict den, const M* __restrict bias, const M* __restrict tol, M* __restrict q,
                   uint8_t* __restrict fl, M* __restrict out, int64_t n) {
  constexpr M kMagic = std::is_same_v<M, float> ? M(12582912.0f) : M(6755399441055744.0);
  for (int64_t j = 0; j < n; ++j) {
    const M zv = z[j];
    const M y = (cpu_math::tanh_fast(zv) + M(1)) * B[j] + M(0.5);
    // floor(y) by rounding and stepping down (std::floor kept gcc 12 from vectorising)
    const M r = (y + kMagic) - kMagic;
    M k = r > y ? r - M(1) : r;
    const M frac = y - k;
    k = std::min(std::max(k, lo[j]), hi[j]);
    q[j] = k;
    fl[j] = static_cast<uint8_t>((frac < tol[j]) | (frac > M(1) - tol[j]) | (zv != zv));
    out[j] = (M(2) * k + bias[j]) / den[j];
  }
}

template <typename T>
void quantize_chunk(const FsqParams& p, const Tiled<math_t<T>>& tiled, const T* z, T* z_hat,
                    int64_t* indices, int64_t rows, std::vector<math_t<T>>& qbuf,
                    std::vector<uint8_t>& flag, std::vector<math_t<T>>& io) {
  using M = math_t<T>;
  const int64_t n = rows * p.d;
  qbuf.resize(n);
  flag.resize(n);
  M* q = qbuf.data();
  uint8_t* fl = flag.data();
  const bool sym = p.preserve_symmetry;

  // fp32 (or fp64) views of the input and output: the tensors themselves, or a converted copy.
  const M* zm;
  M* out;
  if constexpr (std::is_same_v<T, M>) {
    zm = z;
    out = z_hat;
  } else {
    io.resize(2 * n);
    for (int64_t j = 0; j < n; ++j) io[j] = to_math(z[j]);
    zm = io.data();
    out = io.data() + n;
  }
  if (sym) {
    hot_symmetric(zm, tiled.b.data(), tiled.lo.data(), tiled.hi.data(), tiled.den.data(), tiled.bias.data(),
                  tiled.tol.data(), q, fl, out, n);
  } else {
    hot_default(zm, tiled.a.data(), tiled.b.data(), tiled.c.data(), tiled.lo.data(), tiled.hi.data(),
                tiled.den.data(), tiled.tol.data(), q, fl, out, n);
  }
  if constexpr (!std::is_same_v<T, M>) {
    for (int64_t j = 0; j < n; ++j) z_hat[j] = from_math<T>(out[j]);
  }

  const int d = p.d;
  for (int64_t r = 0; r < rows; ++r) {
    const M* qr = q + r * d;
    const uint8_t* fr = fl + r * d;
    uint8_t any = 0;
    for (int i = 0; i < d; ++i) any |= fr[i];
    int64_t index = 0;
    if (!any) {
      for (int i = 0; i < d; ++i) {
        const int64_t k = static_cast<int64_t>(qr[i]) + (sym ? 0 : p.channel[i].half_width);
        index += k * p.channel[i].basis;
      }
      indices[r] = index;
      continue;
    }
    bool has_nan = false;
    for (int i = 0; i < d; ++i) {
      const int64_t j = r * d + i;
      const FsqChannel& ch = p.channel[i];
      const M zv = to_math(z[j]);
      int64_t k;
      if (zv != zv) {
        has_nan = true;
        z_hat[j] = from_math<T>(std::numeric_limits<M>::quiet_NaN());
        continue;
      } else if (fr[i]) {
        k = level_fp64(ch, sym, static_cast<double>(zv));
        z_hat[j] = from_math<T>(code_value<M>(ch, sym, k));
      } else {
        k = static_cast<int64_t>(qr[i]) + (sym ? 0 : ch.half_width);
      }
      index += k * ch.basis;
    }
    indices[r] = has_nan ? -1 : index;
  }
}

template <typename T>
Status quantize_typed(const FsqParams& p, const FsqForwardArgs& args) {
  using M = math_t<T>;
  const int64_t num_chunks = (p.rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const Tiled<M> tiled(p, std::min(p.rows, kRowsPerChunk) * p.d);
  const T* z = static_cast<const T*>(args.z);
  T* z_hat = static_cast<T*>(args.z_hat);
#pragma omp parallel if (p.rows * p.d > 16384)
  {
    std::vector<M> qbuf, io;
    std::vector<uint8_t> flag;
#pragma omp for schedule(static)
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      const int64_t row0 = chunk * kRowsPerChunk;
      const int64_t rows = std::min(kRowsPerChunk, p.rows - row0);
      quantize_chunk<T>(p, tiled, z + row0 * p.d, z_hat + row0 * p.d, args.indices + row0, rows,
                        qbuf, flag, io);
    }
  }
  return Status::Ok();
}

template <typename T>
Status backward_typed(const FsqParams& p, const FsqBackwardArgs& args) {
  using M = math_t<T>;
  const int64_t num_chunks = (p.rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const Tiled<M> tiled(p, std::min(p.rows, kRowsPerChunk) * p.d);
  const T* g = static_cast<const T*>(args.grad_z_hat);
  const T* z = static_cast<const T*>(args.z);
  T* out = static_cast<T*>(args.grad_z);
  const M* A = tiled.a.data();
  const M* G = tiled.grad.data();
#pragma omp parallel for schedule(static) if (p.rows * p.d > 16384)
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    const int64_t e0 = chunk * kRowsPerChunk * p.d;
    const int64_t n = std::min(kRowsPerChunk, p.rows - chunk * kRowsPerChunk) * p.d;
    for (int64_t j = 0; j < n; ++j) {
      const M s = cpu_math::sech2(to_math(z[e0 + j]) + A[j]);
      out[e0 + j] = from_math<T>(to_math(g[e0 + j]) * s * G[j]);
    }
  }
  return Status::Ok();
}

template <typename T>
Status codes_typed(const FsqParams& p, const FsqCodesArgs& args) {
  using M = math_t<T>;
  T* codes = static_cast<T*>(args.codes);
  const bool sym = p.preserve_symmetry;
  const T nan = from_math<T>(std::numeric_limits<M>::quiet_NaN());
#pragma omp parallel for schedule(static) if (p.rows * p.d > 16384)
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t index = args.indices[r];
    T* row = codes + r * p.d;
    if (index < 0 || index >= p.codebook_size) {
      for (int i = 0; i < p.d; ++i) row[i] = nan;
      continue;
    }
    for (int i = 0; i < p.d; ++i) {
      const FsqChannel& ch = p.channel[i];
      const int64_t k = (index / ch.basis) % ch.levels;
      row[i] = from_math<T>(code_value<M>(ch, sym, k));
    }
  }
  return Status::Ok();
}

Status check_sizes(const FsqParams& p) {
  if (p.rows < 0 || p.d < 1 || p.d > kFsqMaxDims) return Status::Error("fsq: need rows >= 0 and 1 <= d <= 31");
  return Status::Ok();
}

}  // namespace

Status run_fsq_quantize_cpu(const FsqParams& params, const FsqForwardArgs& args) {
  Status s = check_sizes(params);
  if (!s.ok || params.rows == 0) return s;
  return FL_DTYPE_SWITCH_WITH_DOUBLE(params.dtype, scalar_t, Status::Error("fsq_quantize: unsupported dtype"),
                                     [&] { return quantize_typed<scalar_t>(params, args); });
}

Status run_fsq_quantize_backward_cpu(const FsqParams& params, const FsqBackwardArgs& args) {
  Status s = check_sizes(params);
  if (!s.ok || params.rows == 0) return s;
  return FL_DTYPE_SWITCH_WITH_DOUBLE(params.dtype, scalar_t,
                                     Status::Error("fsq_quantize_backward: unsupported dtype"),
                                     [&] { return backward_typed<scalar_t>(params, args); });
}

Status run_fsq_indices_to_codes_cpu(const FsqParams& params, const FsqCodesArgs& args) {
  Status s = check_sizes(params);
  if (!s.ok || params.rows == 0) return s;
  return FL_DTYPE_SWITCH_WITH_DOUBLE(params.dtype, scalar_t,
                                     Status::Error("fsq_indices_to_codes: unsupported dtype"),
                                     [&] { return codes_typed<scalar_t>(params, args); });
}

}  // namespace fastlatent
