// Activations and their derivatives in plain fp32 arithmetic that compilers vectorise (no
// libm calls in the hot loops), usable from C++ and CUDA.
//
// exp: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for
// e^r and 2^n through the exponent bits; relative error below 3e-7 over the range used.
// Everything is plain arithmetic so that loops calling it vectorise (checked with gcc 12).
// erf: Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FL_HD __host__ __device__ __forceinline__
#else
#define FL_HD inline
#endif

namespace fastlatent {

enum class Activation : int { kNone = 0, kSilu = 1, kGelu = 2 };

FL_HD float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round to nearest by adding and subtracting 1.5 * 2^23 (floorf would stop gcc vectorising
  // the loop unless traps are disabled).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
#if defined(__CUDA_ARCH__)
  const float scale = __int_as_float(bits);
#else
  const float scale = __builtin_bit_cast(float, bits);  // memcpy here stops gcc vectorising
#endif
  return p * scale;
}

FL_HD float fast_sigmoid(float z) { return 1.0f / (1.0f + fast_exp(-z)); }

FL_HD float fast_erf(float x) {
  const float sign = x < 0.0f ? -1.0f : 1.0f;
  const float a = x < 0.0f ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  return sign * (1.0f - poly * fast_exp(-a * a));
}

// Math in the compute type F: float uses the fast approximations above, double (the CPU's
// float64 path, for gradcheck) uses libm.
FL_HD float act_exp(float x) { return fast_exp(x); }
FL_HD float act_erf(float x) { return fast_erf(x); }
#if !defined(__CUDA_ARCH__)
inline double act_exp(double x) { return std::exp(x); }
inline double act_erf(double x) { return std::erf(x); }
#endif

template <Activation A, typename F>
FL_HD F activate(F z) {
  if constexpr (A == Activation::kSilu) {
    return z / (F(1) + act_exp(-z));
  } else if constexpr (A == Activation::kGelu) {
    return F(0.5) * z * (F(1) + act_erf(z * F(0.70710678118654752)));
  } else {
    return z;
  }
}

// d activate(z) / dz
template <Activation A, typename F>
FL_HD F activate_grad(F z) {
  if constexpr (A == Activation::kSilu) {
    const F s = F(1) / (F(1) + act_exp(-z));
    return s * (F(1) + z * (F(1) - s));
  } else if constexpr (A == Activation::kGelu) {
    const F cdf = F(0.5) * (F(1) + act_erf(z * F(0.70710678118654752)));
    const F pdf = F(0.3989422804014327) * act_exp(F(-0.5) * z * z);
    return cdf + z * pdf;
  } else {
    return F(1);
  }
}

}  // namespace fastlatent

// Runtime Activation -> compile-time constant (no per-element branch).
#define FL_ACTIVATION_SWITCH(ACT, NAME, ...)                                  \
  [&] {                                                                       \
    switch (ACT) {                                                            \
      case ::fastlatent::Activation::kSilu: {                                 \
        constexpr ::fastlatent::Activation NAME = ::fastlatent::Activation::kSilu; \
        return __VA_ARGS__();                                                 \
      }                                                                       \
      case ::fastlatent::Activation::kGelu: {                                 \
        constexpr ::fastlatent::Activation NAME = ::fastlatent::Activation::kGelu; \
        return __VA_ARGS__();                                                 \
      }                                                                       \
      default: {                                                              \
        constexpr ::fastlatent::Activation NAME = ::fastlatent::Activation::kNone; \
        return __VA_ARGS__();                                                 \
      }                                                                       \
    }                                                                         \
  }()
