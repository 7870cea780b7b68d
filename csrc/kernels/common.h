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
inline float to_float(Half h) {
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

// The arithmetic type of a kernel over element type T: fp32, except fp64 stays fp64 (the CPU
// kernels that accept float64 do so for gradcheck).
template <typename T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};
template <typename T>
using compute_t = typename ComputeType<T>::type;

template <typename T>
inline compute_t<T> load(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return to_float(v);
  }
}

// binary32 -> binary16 with round-to-nearest-even; overflow gives Inf, NaN stays NaN.
inline Half to_half(float f) {
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

// binary32 -> bfloat16 with round-to-nearest-even; NaN stays NaN.
inline BFloat16 to_bfloat16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};
  const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>((x + rounding) >> 16)};
}

template <typename T>
inline T store_as(compute_t<T> v) {
  if constexpr (std::is_same_v<T, Half>) {
    return to_half(v);
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    return to_bfloat16(v);
  } else {
    return static_cast<T>(v);
  }
}

}  // namespace fastlatent
