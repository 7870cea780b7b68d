// Shared, torch-free definitions for fastlatent kernels: dtypes, status codes and
// scalar conversions usable from plain C++ (CPU kernels) and from nvcc (host side).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

// Hardware fp16 conversions for to_float_n/from_float_n below, in CPU translation units built with F16C
// (not under nvcc: the CUDA kernels have their own types).
#if defined(__F16C__) && !defined(__CUDACC__)
#include <immintrin.h>
#define FL_HAVE_F16C 1
#endif

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

// IEEE binary16 -> binary32, exact for every input including subnormals and Inf. This and
// float_to_half_portable are the specification, with branches; to_float(Half) and to_half below
// are the branch-free versions the kernels call.
inline float half_to_float_portable(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {
    // zero or subnormal: value = mantissa * 2^-24, exactly representable in fp32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return bits_to_float(sign | float_to_bits(magnitude));
  }
  if (exponent == 31) {  // Inf, or NaN made quiet with its payload kept (as F16C and torch's conversion do)
    return bits_to_float(sign | 0x7f800000u | (mantissa << 13) | (mantissa != 0 ? 0x00400000u : 0u));
  }
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

// The conversions the kernels call, with the results of the two above bit for bit.
//
// With F16C: one instruction each (NaN made sign | 0x7e00 as above). gcc 12 vectorises no _Float16
// conversion short of AVX512-FP16, so loops that call these run scalar (group_norm+SiLU at 2 ns
// per value, 10x fp32): hot loops convert spans with to_float_n / from_float_n below instead.
// Without F16C: branch-free versions that gcc vectorises inline (every case computed, one selected).
#if defined(__F16C__) && defined(__FLT16_MAX__) && !defined(__CUDACC__)
inline float to_float(Half h) { return static_cast<float>(__builtin_bit_cast(_Float16, h.bits)); }
inline Half to_half(float f) {
  const uint16_t bits = __builtin_bit_cast(uint16_t, static_cast<_Float16>(f));
  return Half{f != f ? static_cast<uint16_t>((bits & 0x8000u) | 0x7e00u) : bits};
}
#else
inline float to_float(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t magnitude = h.bits & 0x7fffu;
  const uint32_t normal = (magnitude << 13) + 0x38000000u;     // exponent rebiased by 127 - 15
  const uint32_t quiet = (0u - static_cast<uint32_t>(magnitude > 0x7c00u)) & 0x00400000u;
  const uint32_t inf_nan = (magnitude << 13) | 0x7f800000u | quiet;  // NaN: quiet, payload kept
  const float subnormal = static_cast<float>(static_cast<int32_t>(magnitude)) * 5.9604644775390625e-8f;
  const uint32_t bits = magnitude >= 0x7c00u ? inf_nan : normal;
  // a mask rather than a ternary: gcc would sink the fp multiply into a branch and, fp math being
  // trapping by default, stop vectorising
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(magnitude < 0x400u);
  return __builtin_bit_cast(float, sign | (is_subnormal & __builtin_bit_cast(uint32_t, subnormal)) |
                                       (~is_subnormal & bits));
}

inline Half to_half(float f) {
  const uint32_t x = __builtin_bit_cast(uint32_t, f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  // subnormal or zero: the fp32 adder rounds at 2^-24 once 0.5 sits in front
  const uint32_t subnormal = __builtin_bit_cast(uint32_t, __builtin_bit_cast(float, abs) + 0.5f) - 0x3f000000u;
  const uint32_t normal = (abs - 0x38000000u + 0xfffu + ((abs >> 13) & 1u)) >> 13;
  // masks rather than ternaries (see to_float): 0x7c00 for Inf and overflow, 0x7e00 for NaN
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(abs < 0x38800000u);
  const uint32_t is_inf = 0u - static_cast<uint32_t>(abs >= 0x477ff000u);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(abs > 0x7f800000u);
  const uint32_t finite = (is_subnormal & subnormal) | (~is_subnormal & normal);
  const uint32_t bits = (~is_inf & finite) | (is_inf & (0x7c00u | (is_nan & 0x200u)));
  return Half{static_cast<uint16_t>(sign | bits)};
}
#endif

// binary32 -> bfloat16 with round-to-nearest-even; NaN stays NaN.
inline BFloat16 to_bfloat16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};
  const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>((x + rounding) >> 16)};
}

// n values to fp32 and back, with the results of to_float / to_half / to_bfloat16 bit for bit. Kernels
// over 16-bit storage convert blocks of a few hundred values into fp32 buffers with these and run
// their math on the buffers: loops that convert inline (16-bit loads, fp32 math, 16-bit stores in
// one body) run scalar (fp16 with F16C, above) or vectorise poorly (gcc 12, AVX-512, fp16 SiLU
// apply: 0.58 ns/value with the branch-free conversions inline, 0.29 staged through F16C, 0.23 for
// fp32). With F16C, fp16 spans use the vector instructions (round to nearest even whatever MXCSR
// says; NaN made sign | 0x7e00 first, as to_half does).
inline void to_float_n(const BFloat16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

inline void from_float_n(const float* src, BFloat16* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_bfloat16(src[i]);
}

inline void to_float_n(const Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(FL_HAVE_F16C) && defined(__AVX512F__)
  // the maskz forms, all lanes on, here and below: the plain ones trip gcc 12's -Wmaybe-uninitialized
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_maskz_cvtph_ps(0xffff, h));
  }
#elif defined(FL_HAVE_F16C)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) dst[j] = to_float(src[j]);
}

inline void from_float_n(const float* src, Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(FL_HAVE_F16C) && defined(__AVX512F__)
  const __m512i sign_mask = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m512i quiet_nan = _mm512_set1_epi32(0x7fc00000);  // converts to 0x7e00
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_loadu_ps(src + i);
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(v), sign_mask);
    const __m512 nan = _mm512_castsi512_ps(_mm512_or_si512(sign, quiet_nan));
    v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v, nan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_maskz_cvtps_ph(0xffff, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#elif defined(FL_HAVE_F16C)
  const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(0x80000000u)));
  const __m256 quiet_nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000));
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(src + i);
    const __m256 nan = _mm256_or_ps(_mm256_and_ps(v, sign_mask), quiet_nan);
    v = _mm256_blendv_ps(v, nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) dst[j] = to_half(src[j]);
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
