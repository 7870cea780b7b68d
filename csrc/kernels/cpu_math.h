// Vectorisable transcendental helpers for the CPU kernels (plain C++, no libm calls in the
// fp32 versions, so gcc turns the loops that use them into SIMD code).
//
// exp_nonpos(x), x <= 0: Cephes expf (range reduction by ln 2, degree-6 polynomial, exponent
// built from integer bits); relative error about 1 ulp; inputs below -87 (where expf is
// subnormal or 0) give exactly 0, so tanh(+-Inf) = +-1 and sech^2(+-Inf) = 0. The fp64 overloads call libm: they serve the
// float64 (gradcheck) paths and the rare fp32 boundary fallbacks.
#pragma once

#include <cmath>
#include <cstdint>

namespace fastlatent {
namespace cpu_math {

inline float exp_nonpos(float x_in) {
  const float x = x_in > -87.0f ? x_in : -87.0f;  // NaN -> -87: no float->int conversion of NaN
  // round(x / ln 2) by the 1.5 * 2^23 trick (exact for |x / ln 2| < 2^22)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * (-2.12194440e-4f);
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float result = x_in < -87.0f ? 0.0f : e * __builtin_bit_cast(float, bits);
  return x_in != x_in ? x_in : result;
}

inline double exp_nonpos(double x) { return std::exp(x); }

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): absolute error ~2 ulp of 1.
template <typename M>
inline M tanh_fast(M x) {
  const M ax = x < M(0) ? -x : x;
  const M e = exp_nonpos(M(-2) * ax);
  const M t = (M(1) - e) / (M(1) + e);
  return std::copysign(t, x);  // not a ternary: keeps the loop free of control flow
}
inline double tanh_fast(double x) { return std::tanh(x); }

// 1 - tanh^2(x) = 4e / (1 + e)^2, e = exp(-2|x|): relative accuracy kept in the tails,
// where 1 - t*t would cancel. 0 at +-Inf; NaN stays NaN.
template <typename M>
inline M sech2(M x) {
  const M ax = x < M(0) ? -x : x;
  const M e = exp_nonpos(M(-2) * ax);
  const M s = M(1) + e;
  return M(4) * e / (s * s);
}

// Stable Bernoulli quantities of a logit a: q(+) = sigmoid(a), q(-) = sigmoid(-a), p (1 - p),
// the binary entropy h = log(1 + e^-|a|) + |a| sigmoid(-|a|) (nats) and dh/da = -a p (1 - p),
// all from e = exp(-|a|) without cancellation.
template <typename M>
struct Bernoulli {
  M qpos, qneg, var, entropy, dentropy;
};

template <typename M>
inline Bernoulli<M> bernoulli(M a) {
  const M aa = a < M(0) ? -a : a;
  const M e = cpu_math::exp_nonpos(-aa);  // NaN stays NaN
  const M big = M(1) / (M(1) + e);
  const M small = e * big;
  Bernoulli<M> b;
  b.qpos = a >= M(0) ? big : small;  // NaN: comparison false -> NaN either way
  b.qneg = a >= M(0) ? small : big;
  b.var = small * big;
  // e == 0 (|a| = Inf or beyond exp's range): exactly 0 instead of Inf * 0.
  b.entropy = e == M(0) ? M(0) : static_cast<M>(std::log1p(e)) + aa * small;
  b.dentropy = e == M(0) ? M(0) : -a * b.var;
  return b;
}

}  // namespace cpu_math
}  // namespace fastlatent
