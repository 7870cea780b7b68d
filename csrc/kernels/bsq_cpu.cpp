// CPU BSQ: quantize, its backward, the factorised entropy and its backward. See bsq.h.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "bsq.h"
#include "cpu_math.h"
#include "dispatch.h"

namespace fastlatent {
namespace {

// ||z_row|| in the math type, and whether the row is finite.
template <typename T>
inline math_t<T> row_norm(const T* z, int d, bool* finite) {
  using M = math_t<T>;
  M ss = M(0);
  bool ok = true;
  for (int i = 0; i < d; ++i) {
    const M v = to_math(z[i]);
    ss += v * v;
    ok = ok && std::isfinite(v);
  }
  *finite = ok;
  return std::sqrt(ss);
}

// grad_z = (g - u <u, g>) / ||z|| for ||z|| >= eps, g / eps below (F.normalize's Jacobian).
template <typename T, typename M>
inline void project_backward(const T* z, const M* g, int d, T* grad_z) {
  bool finite;
  const M norm = row_norm(z, d, &finite);
  if (!(norm >= static_cast<M>(kBsqEps))) {
    // also NaN norms: NaN * anything keeps NaN
    const M inv = norm != norm ? norm : M(1) / static_cast<M>(kBsqEps);
    for (int i = 0; i < d; ++i) grad_z[i] = from_math<T>(g[i] * inv);
    return;
  }
  const M inv = M(1) / norm;
  M ug = M(0);
  for (int i = 0; i < d; ++i) ug += to_math(z[i]) * inv * g[i];
  for (int i = 0; i < d; ++i) grad_z[i] = from_math<T>((g[i] - to_math(z[i]) * inv * ug) * inv);
}

template <typename T>
Status quantize_typed(const BsqParams& p) {
  using M = math_t<T>;
  const T* z = static_cast<const T*>(p.z);
  T* q = static_cast<T*>(p.quantized);
  const int d = p.d;
  const M mag = static_cast<M>(1.0 / std::sqrt(static_cast<double>(d)));
  const T pos = from_math<T>(mag), neg = from_math<T>(-mag);
  const T nan = from_math<T>(std::numeric_limits<M>::quiet_NaN());
#pragma omp parallel for schedule(static) if (p.n * d > 32768)
  for (int64_t r = 0; r < p.n; ++r) {
    const T* row = z + r * d;
    bool finite = true;
    for (int i = 0; i < d; ++i) finite = finite && std::isfinite(to_math(row[i]));
    int64_t index = 0;
    for (int i = 0; i < d; ++i) {
      const bool bit = to_math(row[i]) > M(0);  // sign(u) = sign(z) for a finite row
      q[r * d + i] = finite ? (bit ? pos : neg) : nan;
      index = (index << 1) | static_cast<int64_t>(bit);
    }
    p.indices[r] = finite ? index : -1;
  }
  return Status::Ok();
}

template <typename T>
Status quantize_backward_typed(const BsqParams& p) {
  using M = math_t<T>;
  const T* z = static_cast<const T*>(p.z);
  const T* g = static_cast<const T*>(p.grad_quantized);
  T* out = static_cast<T*>(p.grad_z);
  const int d = p.d;
#pragma omp parallel if (p.n * d > 32768)
  {
    std::vector<M> gm(d);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.n; ++r) {
      for (int i = 0; i < d; ++i) gm[i] = to_math(g[r * d + i]);
      project_backward(z + r * d, gm.data(), d, out + r * d);
    }
  }
  return Status::Ok();
}

template <typename T>
Status entropy_typed(const BsqParams& p) {
  using M = math_t<T>;
  const T* z = static_cast<const T*>(p.z);
  M* entropy = static_cast<M*>(p.per_sample_entropy);
  M* avg = static_cast<M*>(p.avg_probs);
  const int d = p.d;
  if (p.n == 0) {
    std::fill(avg, avg + d, std::numeric_limits<M>::quiet_NaN());
    return Status::Ok();
  }
  const M scale = static_cast<M>(p.logit_scale);
  const int64_t num_chunks = (p.n + kBsqChunkRows - 1) / kBsqChunkRows;
  std::vector<double> partial(num_chunks * d, 0.0);
#pragma omp parallel for schedule(static) if (p.n * d > 32768)
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    double* part = partial.data() + chunk * d;
    const int64_t r1 = std::min(p.n, (chunk + 1) * kBsqChunkRows);
    for (int64_t r = chunk * kBsqChunkRows; r < r1; ++r) {
      bool finite;
      const M norm = row_norm(z + r * d, d, &finite);
      const M inv = M(1) / std::max(norm, static_cast<M>(kBsqEps));
      M h = M(0);
      for (int i = 0; i < d; ++i) {
        const cpu_math::Bernoulli<M> b = cpu_math::bernoulli(scale * to_math(z[r * d + i]) * inv);
        h += b.entropy;
        part[i] += static_cast<double>(b.qpos);
      }
      entropy[r] = h;
    }
  }
  for (int i = 0; i < d; ++i) {
    double sum = 0.0;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) sum += partial[chunk * d + i];
    avg[i] = static_cast<M>(sum / static_cast<double>(p.n));
  }
  return Status::Ok();
}

template <typename T>
Status entropy_backward_typed(const BsqParams& p) {
  using M = math_t<T>;
  const T* z = static_cast<const T*>(p.z);
  const M* gps = static_cast<const M*>(p.grad_per_sample);
  const M* gavg = static_cast<const M*>(p.grad_avg_probs);
  T* out = static_cast<T*>(p.grad_z);
  const int d = p.d;
  const M scale = static_cast<M>(p.logit_scale);
  const M inv_n = M(1) / static_cast<M>(p.n);
#pragma omp parallel if (p.n * d > 32768)
  {
    std::vector<M> gu(d);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.n; ++r) {
      bool finite;
      const M norm = row_norm(z + r * d, d, &finite);
      const M inv = M(1) / std::max(norm, static_cast<M>(kBsqEps));
      for (int i = 0; i < d; ++i) {
        const cpu_math::Bernoulli<M> b = cpu_math::bernoulli(scale * to_math(z[r * d + i]) * inv);
        gu[i] = scale * (gps[r] * b.dentropy + gavg[i] * inv_n * b.var);
      }
      project_backward(z + r * d, gu.data(), d, out + r * d);
    }
  }
  return Status::Ok();
}

Status check(const BsqParams& p, const char* message) {
  if (p.n < 0 || p.d < 1 || p.d > kBsqMaxDims) return Status::Error(message);
  return Status::Ok();
}

}  // namespace

Status run_bsq_quantize_cpu(const BsqParams& params) {
  Status s = check(params, "bsq_quantize: need n >= 0 and 1 <= d <= 62");
  if (!s.ok || params.n == 0) return s;
  return FL_DTYPE_SWITCH_WITH_DOUBLE(params.dtype, scalar_t, Status::Error("bsq_quantize: unsupported dtype"),
                                     [&] { return quantize_typed<scalar_t>(params); });
}

Status run_bsq_quantize_backward_cpu(const BsqParams& params) {
  Status s = check(params, "bsq_quantize_backward: need n >= 0 and 1 <= d <= 62");
  if (!s.ok || params.n == 0) return s;
  return FL_DTYPE_SWITCH_WITH_DOUBLE(params.dtype, scalar_t,
                                     Status::Error("bsq_quantize_backward: unsupported dtype"),
                                     [&] { return quantize_backward_typed<scalar_t>(params); });
}

Status run_bsq_entropy_cpu(const BsqParams& params) {
  Status s = check(params, "bsq_entropy: need n >= 0 and 1 <= d <= 62");
  if (!s.ok) return s;
  return FL_DTYPE_SWITCH_WITH_DOUBLE(params.dtype, scalar_t, Status::Error("bsq_entropy: unsupported dtype"),
                                     [&] { return entropy_typed<scalar_t>(params); });
}

Status run_bsq_entropy_backward_cpu(const BsqParams& params) {
  Status s = check(params, "bsq_entropy_backward: need n >= 0 and 1 <= d <= 62");
  if (!s.ok || params.n == 0) return s;
  return FL_DTYPE_SWITCH_WITH_DOUBLE(params.dtype, scalar_t,
                                     Status::Error("bsq_entropy_backward: unsupported dtype"),
                                     [&] { return entropy_backward_typed<scalar_t>(params); });
}

}  // namespace fastlatent
