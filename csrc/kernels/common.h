// Shared, torch-free definitions for fastlatent kernels: dtypes, status codes and
// scalar conversions usable from plain C++ (CPU kernels) and from nvcc (host side).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastlatent {

// Element types the kernels accept. The binding layer maps torch dtypes onto these.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

// Result of a CPU kernel. Kernels never throw or exit: the binding turns a non-OK
// status into a Python error with the message.
struct Status {
  bool ok = true;
  const char* message = "";
  static Status Ok() { return {}; }
  static Status Error(const char* msg) { return {false, msg}; }
};

// 16-bit storage types for the CPU side. Only the bit pattern is stored; math is fp32.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// IEEE binary16 -> binary32, exact for every input including subnormals, Inf and NaN.
// With F16C the compiler's _Float16 conversion is one instruction and vectorises; the
// portable bit manipulation below gives the same results everywhere else.
inline float half_to_float_portable(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {
    // zero or subnormal: value = mantissa * 2^-24, exactly representable in fp32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return bits_to_float(sign | float_to_bits(magnitude));
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline float to_float(BFloat16 b) { return bits_to_float(static_cast<uint32_t>(b.bits) << 16); }
inline float to_float(float f) { return f; }

// binary32 -> binary16 with round-to-nearest-even; overflow gives Inf, NaN stays NaN.
inline Half float_to_half_portable(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (abs >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to Inf
  if (abs < 0x38800000u) {
    // result is subnormal or zero: scale so that the fp32 adder rounds for us
    const float scaled = bits_to_float(abs) + 0.5f;  // 0.5 = 2^-1 aligns ulp to 2^-24
    return Half{static_cast<uint16_t>(sign | (float_to_bits(scaled) - 0x3f000000u))};
  }
  const uint32_t rounding = 0xfffu + ((abs >> 13) & 1u);
  return Half{static_cast<uint16_t>(sign | ((abs - 0x38000000u + rounding) >> 13))};
}

#if defined(__F16C__) && defined(__FLT16_MAX__)
// __builtin_bit_cast rather than memcpy: with memcpy gcc 12 doesn't vectorise the loops.
inline float to_float(Half h) { return static_cast<float>(__builtin_bit_cast(_Float16, h.bits)); }
inline Half to_half(float f) { return Half{__builtin_bit_cast(uint16_t, static_cast<_Float16>(f))}; }
#else
inline float to_float(Half h) { return half_to_float_portable(h); }
inline Half to_half(float f) { return float_to_half_portable(f); }
#endif

// binary32 -> bfloat16 with round-to-nearest-even; NaN stays NaN.
inline BFloat16 to_bfloat16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};
  const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>((x + rounding) >> 16)};
}

// Math type of an element type: fp32 for fp32/fp16/bf16 storage, fp64 for double (the CPU
// kernels accept double so that torch.autograd.gradcheck can run in float64).
template <typename T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };
template <typename T> using math_t = typename MathOf<T>::type;

template <typename T> inline math_t<T> to_math(T v) { return to_float(v); }
template <> inline double to_math<double>(double v) { return v; }

template <typename T> inline T from_math(math_t<T> v);
template <> inline float from_math<float>(float v) { return v; }
template <> inline double from_math<double>(double v) { return v; }
template <> inline Half from_math<Half>(float v) { return to_half(v); }
template <> inline BFloat16 from_math<BFloat16>(float v) { return to_bfloat16(v); }

// fp32 -> storage type for the fp32-only kernels (round to nearest even); from_math above is
// the same for every type but double.
template <typename T>
inline T from_float(float v) {
  return from_math<T>(v);
}

}  // namespace fastlatent
