// CPU LFQ: quantize, entropy and its backward. See lfq.h for the math and the NaN rules.
//
// entropy forward: one parallel pass over samples computes the per-sample entropies and the
// per-dim Bernoulli probabilities q[n, i](+-) (an O(N d) buffer). Then each thread owns a range
// of rows u of the 2^U x 2^L avg_probs matrix and walks every sample in order, in blocks of
// kBlock: it expands wU, wL for the block and adds sum_b wU[b][u] wL[b][:] (fp32, a register
// tile of kTile columns, so the block's products never go through memory) into fp64 row
// accumulators. No cross-thread reduction: bit-identical results for any thread count.
// entropy backward: samples are split statically; per block, hU = wL G^T and hL = wU G are
// axpy loops over rows of G^T / G that stay in L1 across the block, then the leave-one-out
// contractions give dL/da per dimension.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "dispatch.h"
#include "lfq.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastlatent {
namespace {

constexpr int kBlock = 16;  // samples per block
constexpr int kTile = 32;   // avg_probs columns held in registers

// w[idx] = prod_j f_j(bit (m - 1 - j) of idx) for j < m, f_j(1) = pos[j], f_j(0) = neg[j]:
// channel 0 of the range is the most significant bit. When loo >= 0, channel loo uses
// f(1) = +1, f(0) = -1 instead (the leave-one-out derivative weights).
template <typename M>
inline void expand(const M* pos, const M* neg, int m, int loo, M* w) {
  w[0] = M(1);
  int size = 1;
  for (int j = 0; j < m; ++j) {
    const M fp = j == loo ? M(1) : pos[j];
    const M fn = j == loo ? M(-1) : neg[j];
    for (int t = size - 1; t >= 0; --t) {
      const M v = w[t];
      w[2 * t + 1] = v * fp;
      w[2 * t] = v * fn;
    }
    size *= 2;
  }
}

struct Split {
  int u_bits, l_bits;
  int64_t nu, nl;
  explicit Split(int d) : u_bits(d - d / 2), l_bits(d / 2), nu(int64_t{1} << (d - d / 2)), nl(int64_t{1} << (d / 2)) {}
};

// Per-sample pass: entropies, and q(+), q(-) per element into qpos/qneg [n, d].
template <typename T>
void bernoulli_pass(const LfqEntropyParams& p, std::vector<math_t<T>>& qpos, std::vector<math_t<T>>& qneg) {
  using M = math_t<T>;
  const T* x = static_cast<const T*>(p.x);
  M* entropy = static_cast<M*>(p.per_sample_entropy);
  const int d = p.d;
  const M scale = static_cast<M>(p.logit_scale);
  qpos.resize(p.n * d);
  qneg.resize(p.n * d);
#pragma omp parallel for schedule(static) if (p.n * d > 16384)
  for (int64_t r = 0; r < p.n; ++r) {
    M h = M(0);
    for (int i = 0; i < d; ++i) {
      const cpu_math::Bernoulli<M> b = cpu_math::bernoulli(scale * to_math(x[r * d + i]));
      qpos[r * d + i] = b.qpos;
      qneg[r * d + i] = b.qneg;
      h += b.entropy;
    }
    entropy[r] = h;
  }
}

template <typename T>
Status entropy_typed(const LfqEntropyParams& p) {
  using M = math_t<T>;
  const Split s(p.d);
  M* avg = static_cast<M*>(p.avg_probs);
  if (p.n == 0) {
    std::fill(avg, avg + s.nu * s.nl, std::numeric_limits<M>::quiet_NaN());
    return Status::Ok();
  }
  std::vector<M> qpos, qneg;
  bernoulli_pass<T>(p, qpos, qneg);

  const int64_t nl_pad = (s.nl + kTile - 1) / kTile * kTile;
  const int d = p.d;
#pragma omp parallel if (p.n * s.nu * s.nl > (int64_t{1} << 16))
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    const int tid = 0, nth = 1;
#endif
    const int64_t u0 = s.nu * tid / nth, u1 = s.nu * (tid + 1) / nth;
    if (u0 < u1) {
      std::vector<double> acc(static_cast<size_t>((u1 - u0) * s.nl), 0.0);
      std::vector<M> wu(kBlock * s.nu), wl(kBlock * nl_pad, M(0));
      for (int64_t s0 = 0; s0 < p.n; s0 += kBlock) {
        const int nb = static_cast<int>(std::min<int64_t>(kBlock, p.n - s0));
        for (int b = 0; b < nb; ++b) {
          const M* qp = qpos.data() + (s0 + b) * d;
          const M* qn = qneg.data() + (s0 + b) * d;
          expand(qp, qn, s.u_bits, -1, wu.data() + b * s.nu);
          expand(qp + s.u_bits, qn + s.u_bits, s.l_bits, -1, wl.data() + b * nl_pad);
        }
        for (int64_t u = u0; u < u1; ++u) {
          double* row = acc.data() + (u - u0) * s.nl;
          for (int64_t l0 = 0; l0 < s.nl; l0 += kTile) {
            M tile[kTile] = {};
            for (int b = 0; b < nb; ++b) {
              const M w = wu[b * s.nu + u];
              const M* src = wl.data() + b * nl_pad + l0;
              for (int j = 0; j < kTile; ++j) tile[j] += w * src[j];
            }
            const int valid = static_cast<int>(std::min<int64_t>(kTile, s.nl - l0));
            for (int j = 0; j < valid; ++j) row[l0 + j] += static_cast<double>(tile[j]);
          }
        }
      }
      const double inv_n = 1.0 / static_cast<double>(p.n);
      for (int64_t u = u0; u < u1; ++u)
        for (int64_t l = 0; l < s.nl; ++l) avg[u * s.nl + l] = static_cast<M>(acc[(u - u0) * s.nl + l] * inv_n);
    }
  }
  return Status::Ok();
}

template <typename T>
Status entropy_backward_typed(const LfqEntropyParams& p) {
  using M = math_t<T>;
  const Split s(p.d);
  const int d = p.d;
  const T* x = static_cast<const T*>(p.x);
  T* grad_x = static_cast<T*>(p.grad_x);
  const M* gps = static_cast<const M*>(p.grad_per_sample);
  const M* G = static_cast<const M*>(p.grad_avg_probs);
  // G^T, so both products are axpy loops over contiguous rows.
  std::vector<M> GT(s.nu * s.nl);
  for (int64_t u = 0; u < s.nu; ++u)
    for (int64_t l = 0; l < s.nl; ++l) GT[l * s.nu + u] = G[u * s.nl + l];
  const M scale = static_cast<M>(p.logit_scale);
  const M inv_n = M(1) / static_cast<M>(p.n);
  const int64_t num_blocks = (p.n + kBlock - 1) / kBlock;

#pragma omp parallel if (p.n * s.nu * s.nl > (int64_t{1} << 16))
  {
    std::vector<M> wu(kBlock * s.nu), wl(kBlock * s.nl), hu(kBlock * s.nu), hl(kBlock * s.nl);
    std::vector<M> loo(std::max(s.nu, s.nl));
    std::vector<cpu_math::Bernoulli<M>> bern(kBlock * d);
    std::vector<M> qp(kBlock * d), qn(kBlock * d);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < num_blocks; ++block) {
      const int64_t s0 = block * kBlock;
      const int nb = static_cast<int>(std::min<int64_t>(kBlock, p.n - s0));
      for (int b = 0; b < nb; ++b) {
        for (int i = 0; i < d; ++i) {
          const cpu_math::Bernoulli<M> be = cpu_math::bernoulli(scale * to_math(x[(s0 + b) * d + i]));
          bern[b * d + i] = be;
          qp[b * d + i] = be.qpos;
          qn[b * d + i] = be.qneg;
        }
        expand(qp.data() + b * d, qn.data() + b * d, s.u_bits, -1, wu.data() + b * s.nu);
        expand(qp.data() + b * d + s.u_bits, qn.data() + b * d + s.u_bits, s.l_bits, -1, wl.data() + b * s.nl);
      }
      std::fill(hu.begin(), hu.end(), M(0));
      std::fill(hl.begin(), hl.end(), M(0));
      for (int64_t l = 0; l < s.nl; ++l) {
        const M* gt = GT.data() + l * s.nu;
        for (int b = 0; b < nb; ++b) {
          const M w = wl[b * s.nl + l];
          M* h = hu.data() + b * s.nu;
          for (int64_t u = 0; u < s.nu; ++u) h[u] += w * gt[u];
        }
      }
      for (int64_t u = 0; u < s.nu; ++u) {
        const M* g = G + u * s.nl;
        for (int b = 0; b < nb; ++b) {
          const M w = wu[b * s.nu + u];
          M* h = hl.data() + b * s.nl;
          for (int64_t l = 0; l < s.nl; ++l) h[l] += w * g[l];
        }
      }
      for (int b = 0; b < nb; ++b) {
        const int64_t row = s0 + b;
        for (int i = 0; i < d; ++i) {
          const bool high = i < s.u_bits;
          const int m = high ? s.u_bits : s.l_bits;
          const int j = high ? i : i - s.u_bits;
          const M* qpb = qp.data() + b * d + (high ? 0 : s.u_bits);
          const M* qnb = qn.data() + b * d + (high ? 0 : s.u_bits);
          expand(qpb, qnb, m, j, loo.data());
          const M* h = high ? hu.data() + b * s.nu : hl.data() + b * s.nl;
          M r = M(0);
          for (int64_t t = 0; t < (int64_t{1} << m); ++t) r += loo[t] * h[t];
          const cpu_math::Bernoulli<M>& be = bern[b * d + i];
          const M ga = gps[row] * be.dentropy + inv_n * be.var * r;
          grad_x[row * d + i] = from_math<T>(scale * ga);
        }
      }
    }
  }
  return Status::Ok();
}

template <typename T>
Status quantize_typed(const LfqQuantizeParams& p) {
  using M = math_t<T>;
  const T* x = static_cast<const T*>(p.x);
  T* q = static_cast<T*>(p.quantized);
  const int d = p.d;
  const T pos = from_math<T>(static_cast<M>(p.codebook_scale));
  const T neg = from_math<T>(static_cast<M>(-p.codebook_scale));
  const T nan = from_math<T>(std::numeric_limits<M>::quiet_NaN());
#pragma omp parallel for schedule(static) if (p.n * d > 32768)
  for (int64_t r = 0; r < p.n; ++r) {
    int64_t index = 0;
    bool has_nan = false;
    for (int i = 0; i < d; ++i) {
      const M v = to_math(x[r * d + i]);
      const bool bit = v > M(0);
      has_nan |= v != v;
      q[r * d + i] = v != v ? nan : (bit ? pos : neg);
      index = (index << 1) | static_cast<int64_t>(bit);
    }
    p.indices[r] = has_nan ? -1 : index;
  }
  return Status::Ok();
}

}  // namespace

Status run_lfq_quantize_cpu(const LfqQuantizeParams& params) {
  if (params.n < 0 || params.d < 1 || params.d > kLfqMaxQuantizeDims)
    return Status::Error("lfq_quantize: need n >= 0 and 1 <= d <= 62");
  if (params.n == 0) return Status::Ok();
  return FL_DTYPE_SWITCH_WITH_DOUBLE(params.dtype, scalar_t, Status::Error("lfq_quantize: unsupported dtype"),
                                     [&] { return quantize_typed<scalar_t>(params); });
}

Status run_lfq_entropy_cpu(const LfqEntropyParams& params) {
  if (params.n < 0 || params.d < 1 || params.d > kLfqMaxEntropyDims)
    return Status::Error("lfq_entropy: need n >= 0 and 1 <= d <= 18");
  return FL_DTYPE_SWITCH_WITH_DOUBLE(params.dtype, scalar_t, Status::Error("lfq_entropy: unsupported dtype"),
                                     [&] { return entropy_typed<scalar_t>(params); });
}

Status run_lfq_entropy_backward_cpu(const LfqEntropyParams& params) {
  if (params.n < 0 || params.d < 1 || params.d > kLfqMaxEntropyDims)
    return Status::Error("lfq_entropy_backward: need n >= 0 and 1 <= d <= 18");
  if (params.n == 0) return Status::Ok();
  return FL_DTYPE_SWITCH_WITH_DOUBLE(params.dtype, scalar_t,
                                     Status::Error("lfq_entropy_backward: unsupported dtype"),
                                     [&] { return entropy_backward_typed<scalar_t>(params); });
}

}  // namespace fastlatent
