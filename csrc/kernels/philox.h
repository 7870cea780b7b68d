// Counter-based normal noise that the CPU and CUDA kernels draw identically, bit for bit.
//
// Generator: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011), the generator behind curand's and torch's CUDA Philox. A (key, counter) pair maps to
// four independent uint32 words; no state is carried between calls, so every element of a
// tensor can draw its own noise in any order, on any thread, on any device.
//
// fastlatent's noise stream: element e (the flat index into the [B, N] output, 0-based) gets
//   words   = philox4x32_10(counter = {g_lo, g_hi, offset_lo, offset_hi}, key = {seed_lo, seed_hi}),
//             g = e / 4
//   normal  = box_muller(words)[e % 4]
// so (seed, offset) names a stream of 2^66 normals and each sampler step uses its own offset.
//
// Box–Muller: (u1, u2) = ((w0 >> 8) + 1) / 2^24 in (0, 1], (w1 >> 8) / 2^24 in [0, 1);
//   r = sqrt(-2 ln u1), (z0, z1) = (r cos 2 pi u2, r sin 2 pi u2); (z2, z3) likewise from (w2, w3).
// 24 bits per uniform: the tails reach |z| = sqrt(-2 ln 2^-24) = 5.77.
//
// Why not logf/sinf/cosf: glibc and CUDA's libdevice round differently in the last place, so the
// two devices would disagree. log and sincos are written here with IEEE operations only (+, -, *,
// /, sqrt and explicit fma, all correctly rounded on both), and every a * b + c is an explicit
// fma so that neither compiler's FP contraction can change a rounding. Accuracy: within 2 ulp
// of the correctly rounded fp32 result (tested against double precision).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FL_HOST_DEVICE inline
#endif

namespace fastlatent {
namespace philox {

struct Words {
  uint32_t w[4];
};

FL_HOST_DEVICE void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

// Philox4x32 with 10 rounds (Random123's philox4x32_10).
FL_HOST_DEVICE Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c0, hi0, lo0);
    mulhilo(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return Words{{c0, c1, c2, c3}};
}

FL_HOST_DEVICE float fma32(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Correctly rounded on both sides even under --use_fast_math / -prec-div=false.
FL_HOST_DEVICE float div32(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

FL_HOST_DEVICE float sqrt32(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

FL_HOST_DEVICE float from_bits(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

FL_HOST_DEVICE uint32_t to_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// -2 ln(u) for u = k / 2^24, k in [1, 2^24] (so u is a normal float in (0, 1]).
// u = m 2^e with m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172,
// as an odd series to s^11 (next term < 6e-11 relative); e ln 2 with ln 2 split so e * hi is exact.
// Branch-free (the fold into [sqrt(1/2), sqrt(2)) is a select) so that a loop over many u vectorises: the
// CPU kernel draws its noise through this in batches (sampler_step_cpu.cpp, box_muller_batch).
FL_HOST_DEVICE float minus_two_log(float u) {
  const uint32_t bits = to_bits(u);
  const float m0 = from_bits((bits & 0x007fffffu) | 0x3f800000u);
  const bool fold = m0 > 1.41421356f;
  const float m = fold ? m0 * 0.5f : m0;  // exact
  const int e = static_cast<int>(bits >> 23) - 127 + (fold ? 1 : 0);
  const float f = m - 1.0f;  // exact (Sterbenz)
  const float s = div32(f, 2.0f + f);
  const float s2 = s * s;
  float p = 1.0f / 11.0f;
  p = fma32(p, s2, 1.0f / 9.0f);
  p = fma32(p, s2, 1.0f / 7.0f);
  p = fma32(p, s2, 1.0f / 5.0f);
  p = fma32(p, s2, 1.0f / 3.0f);
  const float s3 = s2 * s;
  const float log_m = fma32(s3, p, s) * 2.0f;  // 2 (s + s^3 p)
  constexpr float kLn2Hi = 0.693145751953125f;  // 12 trailing zero bits: e * hi is exact
  constexpr float kLn2Lo = 1.4286068202862268e-06f;
  const float fe = static_cast<float>(e);
  const float log_u = fma32(fe, kLn2Hi, fma32(fe, kLn2Lo, log_m));
  return -2.0f * log_u;
}

// (cos 2 pi t, sin 2 pi t) for t = k / 2^24, k in [0, 2^24): the quarter turn q is taken out in
// integers, leaving f in [-1/8, 1/8] exactly; Taylor polynomials in f to degree 12/13 in 2 pi f. The
// quarter-turn rotation is a chain of selects, not a switch, so that a loop over many k vectorises.
FL_HOST_DEVICE void sincos_turns(uint32_t k, float& c, float& s) {
  const uint32_t q = (k + (1u << 21)) >> 22;  // nearest quarter turn, 0..4
  const float f = static_cast<float>(static_cast<int32_t>(k) - static_cast<int32_t>(q << 22)) * 5.9604644775390625e-8f;
  const float f2 = f * f;
  // sin(2 pi f) = f * sum_j (-1)^j (2 pi)^(2j+1) f^(2j) / (2j+1)!, j = 0..6
  float ps = 3.81995258484828030e+00f;
  ps = fma32(ps, f2, -1.50946425768229840e+01f);
  ps = fma32(ps, f2, 4.20586939448976340e+01f);
  ps = fma32(ps, f2, -7.67058597530613600e+01f);
  ps = fma32(ps, f2, 8.16052492760750400e+01f);
  ps = fma32(ps, f2, -4.13417022403997550e+01f);
  ps = fma32(ps, f2, 6.28318530717958600e+00f);
  const float sin_f = ps * f;
  // cos(2 pi f) = sum_j (-1)^j (2 pi)^(2j) f^(2j) / (2j)!, j = 0..6
  float pc = 7.90353637131846500e+00f;
  pc = fma32(pc, f2, -2.64262567833743880e+01f);
  pc = fma32(pc, f2, 6.02446413718766400e+01f);
  pc = fma32(pc, f2, -8.54568172066937100e+01f);
  pc = fma32(pc, f2, 6.49393940226682800e+01f);
  pc = fma32(pc, f2, -1.97392088021787160e+01f);
  const float cos_f = fma32(pc, f2, 1.0f);
  const uint32_t quarter = q & 3u;
  c = quarter == 0 ? cos_f : quarter == 1 ? -sin_f : quarter == 2 ? -cos_f : sin_f;
  s = quarter == 0 ? sin_f : quarter == 1 ? cos_f : quarter == 2 ? -sin_f : -cos_f;
}

// The four normals of counter group g: element 4 g + j of the stream takes normals.z[j].
struct Normals {
  float z[4];
};

FL_HOST_DEVICE Normals normals(uint64_t seed, uint64_t offset, uint64_t group) {
  const Words w = philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                                static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  Normals out;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int pair = 0; pair < 2; ++pair) {
    const float u1 = static_cast<float>((w.w[2 * pair] >> 8) + 1u) * 5.9604644775390625e-8f;  // exact
    const float r = sqrt32(minus_two_log(u1));
    float c, s;
    sincos_turns(w.w[2 * pair + 1] >> 8, c, s);
    out.z[2 * pair] = r * c;
    out.z[2 * pair + 1] = r * s;
  }
  return out;
}

FL_HOST_DEVICE float normal_at(uint64_t seed, uint64_t offset, uint64_t element) {
  return normals(seed, offset, element >> 2).z[element & 3];
}

}  // namespace philox
}  // namespace fastlatent
