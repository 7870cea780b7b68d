// CPU sampler step (see sampler_step.h): each sample is split into 2048-element chunks spread over OpenMP
// threads, and each chunk is updated in one pass by a loop specialised for the operands present (history
// count, noise, x0 mode, x0 output). fp32 tensors are read and written in place; fp16/bf16 ones are
// converted through fp32 scratch, as is a guided model output (guidance combined on the way in).
// Guidance-rescale statistics and dynamic-threshold quantiles are computed first, per sample, when asked for.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "dispatch.h"
#include "philox.h"
#include "sampler_step.h"

namespace fastlatent {
namespace {

constexpr int64_t kChunk = 2048;
// Below this many elements one thread finishes before OpenMP would have woken the others.
constexpr int64_t kParallelElements = 32768;

// fp32 copy or the vectorised fp16/bf16 span conversion (to_float_n: the bits of to_float, many times faster
// than converting one element at a time, which gcc leaves scalar for fp16)
template <typename T>
inline void load(const T* src, int64_t count, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + count, dst);
  } else {
    to_float_n(src, dst, count);
  }
}

// Normals of stream elements [first, first + count), bit for bit philox::normals (philox.h) but in
// batches of kNoiseGroups counter groups laid out as structure-of-arrays, so that gcc vectorises every
// loop below (AVX2: 8 lanes; vpmuludq for Philox's 32x32->64 products). The Philox rounds are philox.h's
// op for op, over arrays of counters; the Box-Muller transform calls philox.h's branch-free functions
// themselves (explicit fma, correctly rounded / and sqrt), so the two cannot drift apart. Each chunk of the caller's loop draws its own elements from their stream indices, so
// the numbers do not depend on the thread count or chunking. Measured on one thread of an AVX2 CPU,
// 131072 normals: 0.8 ms (the scalar loop: 2.4-3.3 ms; torch.randn: 1.1 ms).
constexpr int kNoiseGroups = 64;  // 256 normals per batch: fits L1 beside the chunk's operands

void philox_batch(uint64_t seed, uint64_t offset, uint64_t g0, uint32_t (&w)[4][kNoiseGroups]) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int i = 0; i < kNoiseGroups; ++i) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    w[0][i] = static_cast<uint32_t>(g);
    w[1][i] = static_cast<uint32_t>(g >> 32);
    w[2][i] = static_cast<uint32_t>(offset);
    w[3][i] = static_cast<uint32_t>(offset >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < kNoiseGroups; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(kM0) * w[0][i];
      const uint64_t p1 = static_cast<uint64_t>(kM1) * w[2][i];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ w[1][i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ w[3][i] ^ k1;
      w[0][i] = n0;
      w[1][i] = static_cast<uint32_t>(p1);
      w[2][i] = n2;
      w[3][i] = static_cast<uint32_t>(p0);
    }
    k0 += kW0;
    k1 += kW1;
  }
}

// Box-Muller of one word pair per lane: z[2 i] = r cos, z[2 i + 1] = r sin, as philox::normals, through
// philox.h's own (branch-free) minus_two_log and sincos_turns, which gcc vectorises once inlined here.
// r_out holds r^2 on return: an errno-setting sqrt (the build keeps -fmath-errno) is a branch gcc will
// not vectorise, so sqrt_batch takes the square roots afterwards.
void box_muller_batch(const uint32_t* wu, const uint32_t* wt, float (&r_out)[kNoiseGroups],
                      float (&c_out)[kNoiseGroups], float (&s_out)[kNoiseGroups]) {
  for (int i = 0; i < kNoiseGroups; ++i) {
    const float u = static_cast<float>((wu[i] >> 8) + 1u) * 5.9604644775390625e-8f;  // exact
    r_out[i] = philox::minus_two_log(u);
    philox::sincos_turns(wt[i] >> 8, c_out[i], s_out[i]);
  }
}

// In place; the vector instructions are IEEE correctly rounded, as std::sqrt and CUDA's __fsqrt_rn.
void sqrt_batch(float (&x)[kNoiseGroups]) {
  int i = 0;
#if defined(__AVX__)
  for (; i + 8 <= kNoiseGroups; i += 8) _mm256_storeu_ps(x + i, _mm256_sqrt_ps(_mm256_loadu_ps(x + i)));
#elif defined(__SSE2__)
  for (; i + 4 <= kNoiseGroups; i += 4) _mm_storeu_ps(x + i, _mm_sqrt_ps(_mm_loadu_ps(x + i)));
#endif
  for (; i < kNoiseGroups; ++i) x[i] = std::sqrt(x[i]);
}

void fill_normals(uint64_t seed, uint64_t offset, int64_t first, int64_t count, float* z) {
  int64_t e = first;
  const int64_t end = first + count;
  // scalar head up to a group boundary, then whole batches, then a scalar tail
  auto scalar_until = [&](int64_t stop) {
    while (e < stop) {
      const uint64_t group = static_cast<uint64_t>(e) >> 2;
      const philox::Normals normals = philox::normals(seed, offset, group);
      const int64_t group_end = std::min<int64_t>(stop, static_cast<int64_t>(group + 1) * 4);
      for (; e < group_end; ++e) z[e - first] = normals.z[e & 3];
    }
  };
  scalar_until(std::min<int64_t>(end, (first + 3) & ~int64_t{3}));
  constexpr int64_t kBatch = 4 * kNoiseGroups;
  for (; e + kBatch <= end; e += kBatch) {
    uint32_t w[4][kNoiseGroups];
    float r[2][kNoiseGroups], c[2][kNoiseGroups], s[2][kNoiseGroups];
    philox_batch(seed, offset, static_cast<uint64_t>(e) >> 2, w);
    box_muller_batch(w[0], w[1], r[0], c[0], s[0]);
    box_muller_batch(w[2], w[3], r[1], c[1], s[1]);
    sqrt_batch(r[0]);
    sqrt_batch(r[1]);
    float* dst = z + (e - first);
    for (int i = 0; i < kNoiseGroups; ++i) {
      dst[4 * i] = r[0][i] * c[0][i];
      dst[4 * i + 1] = r[0][i] * s[0][i];
      dst[4 * i + 2] = r[1][i] * c[1][i];
      dst[4 * i + 3] = r[1][i] * s[1][i];
    }
  }
  scalar_until(end);
}

// m for elements [i0, i0 + count) of sample b: guidance combined, rescale factor applied. fp32 halves are
// combined straight from the model output (one pass, no staging copy).
template <typename T>
void load_model(const SamplerStepParams& p, int64_t b, int64_t i0, int64_t count, float factor, float* m,
                float* scratch) {
  const T* model = static_cast<const T*>(p.model_output);
  const T* uncond = model + b * p.n + i0;
  if (!p.guided) {
    load(uncond, count, m);
  } else {
    const T* cond = model + (p.batch + b) * p.n + i0;
    const float *u = m, *c = scratch;
    if constexpr (std::is_same_v<T, float>) {
      u = uncond;
      c = cond;
    } else {
      load(uncond, count, m);
      load(cond, count, scratch);
    }
    const float g = p.guidance_scale;
    for (int64_t i = 0; i < count; ++i) m[i] = u[i] + g * (c[i] - u[i]);
  }
  if (p.guidance_rescale > 0.0f)
    for (int64_t i = 0; i < count; ++i) m[i] = m[i] * factor;
}

// Per-sample factor phi std(c) / std(m) + 1 - phi. Fixed chunks summed in order: deterministic.
template <typename T>
void rescale_factors(const SamplerStepParams& p, float* factor) {
  const int64_t chunks = sampler_stats_chunks(p.n), per_chunk = (p.n + chunks - 1) / chunks;
  std::vector<double> partial(p.batch * chunks * 4, 0.0);
  const T* model = static_cast<const T*>(p.model_output);
#pragma omp parallel for schedule(static) if (p.batch * p.n > kParallelElements)
  for (int64_t t = 0; t < p.batch * chunks; ++t) {
    const int64_t b = t / chunks, begin = (t % chunks) * per_chunk, end = std::min(p.n, begin + per_chunk);
    double sc = 0, sc2 = 0, sm = 0, sm2 = 0;
    for (int64_t i = begin; i < end; ++i) {
      const float u = to_float(model[b * p.n + i]), c = to_float(model[(p.batch + b) * p.n + i]);
      const float m = u + p.guidance_scale * (c - u);
      sc += c;
      sc2 += static_cast<double>(c) * c;
      sm += m;
      sm2 += static_cast<double>(m) * m;
    }
    double* out = partial.data() + t * 4;
    out[0] = sc;
    out[1] = sc2;
    out[2] = sm;
    out[3] = sm2;
  }
  for (int64_t b = 0; b < p.batch; ++b) {
    double s[4] = {0, 0, 0, 0};
    for (int64_t j = 0; j < chunks; ++j)
      for (int q = 0; q < 4; ++q) s[q] += partial[(b * chunks + j) * 4 + q];
    factor[b] = rescale_factor(s[0], s[1], s[2], s[3], p.n, p.guidance_rescale);
  }
}

// Per-sample s = clamp(quantile(|x0|, p), 1, s_max), exact: two order statistics by selection.
template <typename T>
void thresholds(const SamplerStepParams& p, const float* factor, float* thresh) {
  const double position = p.threshold_quantile * static_cast<double>(p.n - 1);
  const int64_t lo = static_cast<int64_t>(std::floor(position));
  const int64_t hi = std::min(lo + 1, p.n - 1);
  const float weight = static_cast<float>(position - static_cast<double>(lo));
  const T* sample = static_cast<const T*>(p.sample);
#pragma omp parallel if (p.batch * p.n > kParallelElements)
  {
    std::vector<float> values(p.n), m(kChunk), scratch(kChunk);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t i0 = 0; i0 < p.n; i0 += kChunk) {
        const int64_t count = std::min(kChunk, p.n - i0);
        load_model<T>(p, b, i0, count, factor[b], m.data(), scratch.data());
        load(sample + b * p.n + i0, count, scratch.data());
        for (int64_t i = 0; i < count; ++i) values[i0 + i] = std::fabs(p.c.x0_x * scratch[i] + p.c.x0_m * m[i]);
      }
      // torch.quantile: any NaN makes the quantile NaN (nth_element needs a strict weak order anyway)
      if (std::any_of(values.begin(), values.end(), [](float v) { return std::isnan(v); })) {
        thresh[b] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      std::nth_element(values.begin(), values.begin() + lo, values.end());
      const float below = values[lo];
      const float above = hi == lo ? below : *std::min_element(values.begin() + lo + 1, values.end());
      const float q = quantile_lerp(below, above, weight);
      thresh[b] = std::min(std::max(q, 1.0f), p.threshold_max);
    }
  }
}

// The update over `count` fp32 elements in one pass, straight from the operand pointers: x, m and the
// history tensors are read once, out (and x0) written once. Which operands exist is a template argument,
// so each instantiation is one branch-free loop the compiler vectorises. Measured on one core of the
// 2-core EPYC CI machine, an Euler step with x0 over 131072 fp32 elements: 397 us when every operand was
// staged through fp32 scratch and combined in separate loops, 70 us now (torch.add of two such tensors:
// 38 us; the rest is the op's fixed cost and the second output).
struct Operands {
  const float* x;
  const float* m;
  const float* h[kMaxHistory];  // the non-null history tensors, in slot order
  const float* z;               // noise, or null
  float* out;
  float* x0;                    // null when x0 is not returned
};

// restrict-qualified parameters (gcc ignores restrict on local pointers): without them gcc versions the
// loop for every pair of operands and, past its limit of alias checks, leaves it scalar (10x slower).
//
// kX0Term = false: the step has no out_x0 x0' term (x0 mode kNone, out_x0 == 0; every named step but the
// clipped/thresholded ones and the generic op with an explicit out_x0), so the loop skips it, and x0 is
// computed only when it is returned. The general loop still computes 0 * x0: 5 of its 7 vector FP
// operations are multiplies or FMAs, which run on 2 of Zen1's 4 FP pipes, so an Euler step took 2.5 cycles
// per 4 elements, compute-bound where torch.add is bound by memory (one core of the 2-core EPYC CI machine,
// 131072 fp32 elements, CPU time: 54.7 us through the general loop, 38.8 us through this one, torch.add
// 29 us; the rest is the op's fixed cost, mostly the dispatcher's Python argument parsing). Same bits: t + 0 * x0 equals t when x0 is finite, and the
// signed-zero cases are settled by the `+ history` add that follows in both (history is never -0); only an
// infinite x0 differs (0 * inf gave NaN; now the step's own terms decide, as in diffusers).
template <int kHistory, bool kNoise, X0Mode kMode, bool kX0, bool kX0Term>
void update_loop(const StepCoefficients c, const float p0, const float p1, const float p2, const float clip,
                 const float thresh, const float* __restrict__ x, const float* __restrict__ m,
                 const float* __restrict__ h0, const float* __restrict__ h1, const float* __restrict__ h2,
                 const float* __restrict__ z, float* __restrict__ out, float* __restrict__ x0, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    // summed in slot order from 0, as the CUDA kernel does
    float history = 0.0f;
    if constexpr (kHistory > 0) history += p0 * h0[i];
    if constexpr (kHistory > 1) history += p1 * h1[i];
    if constexpr (kHistory > 2) history += p2 * h2[i];
    if constexpr (kX0Term) {
      const StepElement r = step_element(c, kMode, clip, thresh, x[i], m[i], history, kNoise ? z[i] : 0.0f);
      out[i] = r.out;
      if constexpr (kX0) x0[i] = r.x0;
    } else {
      // step_element_without_x0_term, without its noise term when there is none (adding out_noise * 0 =
      // +-0 to a sum that is never -0 changes no bit; the multiply would cost a vector FMA per 4 elements)
      const float xi = x[i], mi = m[i];
      float o = c.out_x * xi + c.out_m * mi + history;
      if constexpr (kNoise) o = o + c.out_noise * z[i];
      out[i] = o;
      if constexpr (kX0) x0[i] = c.x0_x * xi + c.x0_m * mi;
    }
  }
}

template <int kHistory, bool kNoise, X0Mode kMode, bool kX0, bool kX0Term>
void update(const StepCoefficients& c, const float* out_prev, float clip, float thresh, const Operands& o,
            int64_t count) {
  update_loop<kHistory, kNoise, kMode, kX0, kX0Term>(c, out_prev[0], out_prev[1], out_prev[2], clip, thresh, o.x,
                                                     o.m, o.h[0], o.h[1], o.h[2], o.z, o.out, o.x0, count);
}

using UpdateFn = void (*)(const StepCoefficients&, const float*, float, float, const Operands&, int64_t);

template <int kHistory, bool kNoise, X0Mode kMode>
UpdateFn pick_x0(bool x0, bool x0_term) {
  if constexpr (kMode == X0Mode::kNone) {
    if (!x0_term)
      return x0 ? update<kHistory, kNoise, kMode, true, false> : update<kHistory, kNoise, kMode, false, false>;
  }
  return x0 ? update<kHistory, kNoise, kMode, true, true> : update<kHistory, kNoise, kMode, false, true>;
}

template <int kHistory, bool kNoise>
UpdateFn pick_mode(X0Mode mode, bool x0, bool x0_term) {
  switch (mode) {
    case X0Mode::kClip:
      return pick_x0<kHistory, kNoise, X0Mode::kClip>(x0, x0_term);
    case X0Mode::kThreshold:
      return pick_x0<kHistory, kNoise, X0Mode::kThreshold>(x0, x0_term);
    default:
      return pick_x0<kHistory, kNoise, X0Mode::kNone>(x0, x0_term);
  }
}

template <int kHistory>
UpdateFn pick_noise(bool noise, X0Mode mode, bool x0, bool x0_term) {
  return noise ? pick_mode<kHistory, true>(mode, x0, x0_term) : pick_mode<kHistory, false>(mode, x0, x0_term);
}

UpdateFn pick_update(int history, bool noise, X0Mode mode, bool x0, bool x0_term) {
  switch (history) {
    case 1:
      return pick_noise<1>(noise, mode, x0, x0_term);
    case 2:
      return pick_noise<2>(noise, mode, x0, x0_term);
    case 3:
      return pick_noise<3>(noise, mode, x0, x0_term);
    default:
      return pick_noise<0>(noise, mode, x0, x0_term);
  }
}

// fp32 -> bf16 with to_bfloat16's bits (round to nearest even, NaN kept quiet), with the NaN case a select
// rather than an early return, so that the loop vectorises (from_float_n's bf16 loop stays scalar).
inline void store_n(const float* __restrict__ src, BFloat16* __restrict__ dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t x = __builtin_bit_cast(uint32_t, src[i]);
    const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    const uint32_t quiet = (x >> 16) | 0x40u;
    dst[i].bits = static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
  }
}

inline void store_n(const float* src, Half* dst, int64_t count) { from_float_n(src, dst, count); }

// fp32 operands are read and written in place; fp16/bf16 ones are converted through fp32 scratch
// (to_float_n, store_n), and guided model outputs are combined into scratch first.
template <typename T>
const float* operand(const void* base, int64_t offset, int64_t count, float* scratch) {
  const T* src = static_cast<const T*>(base) + offset;
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_float_n(src, scratch, count);
    return scratch;
  }
}

#if defined(FL_HAVE_F16C) && defined(__FMA__) && defined(__AVX2__)
#define FL_FUSED_16BIT_STEP 1
// fp16/bf16 steps of the form out = out_x x + out_m m (+ x0 = x0_x x + x0_m m): Euler, DDIM/DDPM without
// clipping or noise, convert_prediction. One pass with the conversions in registers, where the staged path
// writes x, m and out through fp32 scratch (7 vector stores per 8 elements instead of 1: one core, 131072
// fp16 elements, Euler 110 us staged, 92 us fused). Same bits as the staged path: exact widening,
// update_loop's fp32 operations (out = fma(out_x, x, out_m m) + 0, its `+ history`; x0 = fma(x0_x, x,
// x0_m m)) and the staged narrowing (fp16: from_float_n, NaN made sign | 0x7e00 then round to nearest
// even; bf16: store_n). A tail of fewer than 8 elements goes through the same vector code on a zero-padded
// copy.
inline __m256 load8(const Half* src) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}

inline __m256 load8(const BFloat16* src) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline void store8(__m256 v, Half* dst) {
  const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(0x80000000u)));
  const __m256 quiet_nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000));
  const __m256 nan = _mm256_or_ps(_mm256_and_ps(v, sign_mask), quiet_nan);
  v = _mm256_blendv_ps(v, nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// store_n's rounding: (x + 0x7fff + lsb) >> 16, NaN -> (x >> 16) | 0x40
inline void store8(__m256 v, BFloat16* dst) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
  const __m256i abs = _mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff));
  const __m256i is_nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));  // abs < 2^31: signed compare ok
  const __m256i bits = _mm256_blendv_epi8(rounded, quiet, is_nan);
  // 8 x 32-bit (each < 2^16) -> 8 x 16-bit: pack within 128-bit lanes, then gather the two low quadwords
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
}

template <typename T, bool kX0>
void fused_update(const StepCoefficients& c, const T* x, const T* m, T* out, T* x0, int64_t count) {
  const __m256 out_x = _mm256_set1_ps(c.out_x), out_m = _mm256_set1_ps(c.out_m);
  const __m256 x0_x = _mm256_set1_ps(c.x0_x), x0_m = _mm256_set1_ps(c.x0_m), zero = _mm256_setzero_ps();
  auto eight = [&](const T* xs, const T* ms, T* os, T* x0s) {
    const __m256 xv = load8(xs), mv = load8(ms);
    store8(_mm256_add_ps(_mm256_fmadd_ps(out_x, xv, _mm256_mul_ps(out_m, mv)), zero), os);
    if constexpr (kX0) store8(_mm256_fmadd_ps(x0_x, xv, _mm256_mul_ps(x0_m, mv)), x0s);
  };
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) eight(x + i, m + i, out + i, kX0 ? x0 + i : nullptr);
  if (i < count) {
    T xs[8] = {}, ms[8] = {}, os[8], x0s[8];
    std::copy(x + i, x + count, xs);
    std::copy(m + i, m + count, ms);
    eight(xs, ms, os, x0s);
    std::copy(os, os + (count - i), out + i);
    if constexpr (kX0) std::copy(x0s, x0s + (count - i), x0 + i);
  }
}
#endif

// The chunk [offset, offset + count) of model_output into model_output_copy, if asked: right after the step
// read it, so the copy reads from cache.
template <typename T>
void copy_model_output(const SamplerStepParams& p, int64_t offset, int64_t count) {
  if (p.model_output_copy == nullptr) return;
  std::memcpy(static_cast<T*>(p.model_output_copy) + offset, static_cast<const T*>(p.model_output) + offset,
              static_cast<size_t>(count) * sizeof(T));
}

template <typename T>
void step(const SamplerStepParams& p) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  const int64_t batch = p.batch, n = p.n;
  std::vector<float> factor(batch, 1.0f), thresh(batch, 1.0f);
  if (p.guided && p.guidance_rescale > 0.0f) rescale_factors<T>(p, factor.data());
  if (p.x0_mode == X0Mode::kThreshold) thresholds<T>(p, factor.data(), thresh.data());
  const bool draw = p.c.out_noise != 0.0f && p.noise == nullptr;
  const bool noise_in = p.c.out_noise != 0.0f && p.noise != nullptr;
  int history = 0;
  const void* prev[kMaxHistory] = {nullptr, nullptr, nullptr};
  float out_prev[kMaxHistory] = {0.0f, 0.0f, 0.0f};
  for (int j = 0; j < kMaxHistory; ++j) {
    if (p.prev[j] == nullptr) continue;
    prev[history] = p.prev[j];
    out_prev[history++] = p.c.out_prev[j];
  }
#if defined(FL_FUSED_16BIT_STEP)
  if constexpr (!kFloat) {
    if (!p.guided && history == 0 && !draw && !noise_in && p.x0_mode == X0Mode::kNone && p.c.out_x0 == 0.0f) {
      const T* x = static_cast<const T*>(p.sample);
      const T* m = static_cast<const T*>(p.model_output);
      T* out = static_cast<T*>(p.out);
      T* x0 = static_cast<T*>(p.x0_out);
      const int64_t total = batch * n, chunks = (total + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (total > kParallelElements)
      for (int64_t t = 0; t < chunks; ++t) {
        const int64_t i0 = t * kChunk, count = std::min(kChunk, total - i0);
        if (x0 != nullptr)
          fused_update<T, true>(p.c, x + i0, m + i0, out + i0, x0 + i0, count);
        else
          fused_update<T, false>(p.c, x + i0, m + i0, out + i0, nullptr, count);
        copy_model_output<T>(p, i0, count);
      }
      return;
    }
  }
#endif
  const UpdateFn run =
      pick_update(history, draw || noise_in, p.x0_mode, p.x0_out != nullptr, has_x0_term(p.c, p.x0_mode));
  const bool staged_m = p.guided || p.guidance_rescale > 0.0f || !kFloat;
  const int64_t chunks_per_sample = (n + kChunk - 1) / kChunk;
#pragma omp parallel if (batch * n > kParallelElements)
  {
    // scratch only for what cannot be read or written in place: noise and the staged model output (fp32);
    // every operand and both outputs (fp16/bf16)
    const int64_t slots = kFloat ? (staged_m ? 3 : 1) : 6 + kMaxHistory;
    std::vector<float> scratch(slots * kChunk);
    float* z_buf = scratch.data();
    float* m_buf = slots > 1 ? z_buf + kChunk : nullptr;
    float* m_tmp = slots > 1 ? m_buf + kChunk : nullptr;  // the conditional half while guidance is combined
    float* x_buf = kFloat ? nullptr : m_tmp + kChunk;
    float* out_buf = kFloat ? nullptr : x_buf + kChunk;
    float* x0_buf = kFloat ? nullptr : out_buf + kChunk;
    float* h_buf = kFloat ? nullptr : x0_buf + kChunk;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < batch * chunks_per_sample; ++t) {
      const int64_t b = t / chunks_per_sample, i0 = (t % chunks_per_sample) * kChunk;
      const int64_t count = std::min(kChunk, n - i0), base = b * n + i0;
      Operands o{};
      o.x = operand<T>(p.sample, base, count, x_buf);
      if (staged_m) {
        load_model<T>(p, b, i0, count, factor[b], m_buf, m_tmp);
        o.m = m_buf;
      } else {
        o.m = static_cast<const float*>(p.model_output) + base;
      }
      for (int j = 0; j < history; ++j)
        o.h[j] = operand<T>(prev[j], base, count, kFloat ? nullptr : h_buf + j * kChunk);
      if (draw) {
        fill_normals(p.seed, p.offset, base, count, z_buf);
        o.z = z_buf;
      } else if (noise_in) {
        o.z = operand<T>(p.noise, base, count, z_buf);
      }
      T* dst = static_cast<T*>(p.out) + base;
      T* dst_x0 = p.x0_out != nullptr ? static_cast<T*>(p.x0_out) + base : nullptr;
      if constexpr (kFloat) {
        o.out = dst;
        o.x0 = dst_x0;
      } else {
        o.out = out_buf;
        o.x0 = dst_x0 != nullptr ? x0_buf : nullptr;
      }
      run(p.c, out_prev, p.clip, thresh[b], o, count);
      if constexpr (!kFloat) {
        store_n(out_buf, dst, count);
        if (dst_x0 != nullptr) store_n(x0_buf, dst_x0, count);
      }
      copy_model_output<T>(p, base, count);
    }
  }
}

}  // namespace

Status run_sampler_step_cpu(const SamplerStepParams& p) {
  if (p.batch < 0 || p.n < 0) return Status::Error("sampler step: negative sizes");
  if (p.batch == 0 || p.n == 0) return Status::Ok();
  if (p.guidance_rescale > 0.0f && (!p.guided || p.n < 2))
    return Status::Error("sampler step: guidance rescale needs guidance and N >= 2");
  if (p.model_output_copy != nullptr && p.guided)
    return Status::Error("sampler step: a model output copy is only made of an unguided step");
  return FL_DTYPE_SWITCH(p.dtype, scalar_t, Status::Error("sampler step: unsupported dtype"), [&] {
    step<scalar_t>(p);
    return Status::Ok();
  });
}

}  // namespace fastlatent
