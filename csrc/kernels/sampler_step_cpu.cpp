// CPU sampler step (see sampler_step.h): each 2048-element chunk of a sample is loaded into fp32
// scratch (guidance combined on the way in), updated by step_element in a loop the compiler
// vectorises, and stored; chunks are spread over OpenMP threads. Guidance-rescale statistics
// and dynamic-threshold quantiles are computed first, per sample, when asked for.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dispatch.h"
#include "philox.h"
#include "sampler_step.h"

namespace fastlatent {
namespace {

constexpr int64_t kChunk = 2048;
// Below this many elements one thread finishes before OpenMP would have woken the others.
constexpr int64_t kParallelElements = 32768;

template <typename T>
inline void load(const T* src, int64_t count, float* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = to_float(src[i]);
}

// Normals of stream elements [first, first + count): one Philox call per group of four.
void fill_normals(uint64_t seed, uint64_t offset, int64_t first, int64_t count, float* z) {
  int64_t e = first;
  const int64_t end = first + count;
  while (e < end) {
    const uint64_t group = static_cast<uint64_t>(e) >> 2;
    const philox::Normals normals = philox::normals(seed, offset, group);
    const int64_t stop = std::min<int64_t>(end, static_cast<int64_t>(group + 1) * 4);
    for (; e < stop; ++e) z[e - first] = normals.z[e & 3];
  }
}

// m for elements [i0, i0 + count) of sample b: guidance combined, rescale factor applied.
template <typename T>
void load_model(const SamplerStepParams& p, int64_t b, int64_t i0, int64_t count, float factor, float* m,
                float* scratch) {
  const T* model = static_cast<const T*>(p.model_output);
  load(model + b * p.n + i0, count, m);
  if (p.guided) {
    load(model + (p.batch + b) * p.n + i0, count, scratch);
    const float g = p.guidance_scale;
    for (int64_t i = 0; i < count; ++i) m[i] = m[i] + g * (scratch[i] - m[i]);
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

template <typename T>
void step(const SamplerStepParams& p) {
  const int64_t batch = p.batch, n = p.n;
  std::vector<float> factor(batch, 1.0f), thresh(batch, 1.0f);
  if (p.guided && p.guidance_rescale > 0.0f) rescale_factors<T>(p, factor.data());
  if (p.x0_mode == X0Mode::kThreshold) thresholds<T>(p, factor.data(), thresh.data());
  const bool draw = p.c.out_noise != 0.0f && p.noise == nullptr;
  const bool noise_in = p.c.out_noise != 0.0f && p.noise != nullptr;
  const int64_t chunks_per_sample = (n + kChunk - 1) / kChunk;
#pragma omp parallel if (batch * n > kParallelElements)
  {
    std::vector<float> scratch(7 * kChunk, 0.0f);
    float* x = scratch.data();
    float* m = x + kChunk;
    float* z = m + kChunk;
    float* out = z + kChunk;
    float* x0 = out + kChunk;
    float* hist = x0 + kChunk;   // sum_j out_prev[j] h_j
    float* prev = hist + kChunk;  // one history tensor at a time
#pragma omp for schedule(static)
    for (int64_t t = 0; t < batch * chunks_per_sample; ++t) {
      const int64_t b = t / chunks_per_sample, i0 = (t % chunks_per_sample) * kChunk;
      const int64_t count = std::min(kChunk, n - i0), base = b * n + i0;
      load(static_cast<const T*>(p.sample) + base, count, x);
      load_model<T>(p, b, i0, count, factor[b], m, out);
      for (int64_t i = 0; i < count; ++i) hist[i] = 0.0f;
      for (int j = 0; j < kMaxHistory; ++j) {
        if (p.prev[j] == nullptr) continue;
        load(static_cast<const T*>(p.prev[j]) + base, count, prev);
        const float coefficient = p.c.out_prev[j];
        for (int64_t i = 0; i < count; ++i) hist[i] += coefficient * prev[i];
      }
      if (draw) fill_normals(p.seed, p.offset, base, count, z);
      if (noise_in) load(static_cast<const T*>(p.noise) + base, count, z);
      const StepCoefficients c = p.c;
      const X0Mode mode = p.x0_mode;
      const float clip = p.clip, s = thresh[b];
      for (int64_t i = 0; i < count; ++i) {
        const StepElement r = step_element(c, mode, clip, s, x[i], m[i], hist[i], z[i]);
        out[i] = r.out;
        x0[i] = r.x0;
      }
      T* dst = static_cast<T*>(p.out) + base;
      for (int64_t i = 0; i < count; ++i) dst[i] = from_float<T>(out[i]);
      if (p.x0_out != nullptr) {
        T* dst_x0 = static_cast<T*>(p.x0_out) + base;
        for (int64_t i = 0; i < count; ++i) dst_x0[i] = from_float<T>(x0[i]);
      }
    }
  }
}

}  // namespace

Status run_sampler_step_cpu(const SamplerStepParams& p) {
  if (p.batch < 0 || p.n < 0) return Status::Error("sampler step: negative sizes");
  if (p.batch == 0 || p.n == 0) return Status::Ok();
  if (p.guidance_rescale > 0.0f && (!p.guided || p.n < 2))
    return Status::Error("sampler step: guidance rescale needs guidance and N >= 2");
  return FL_DTYPE_SWITCH(p.dtype, scalar_t, Status::Error("sampler step: unsupported dtype"), [&] {
    step<scalar_t>(p);
    return Status::Ok();
  });
}

}  // namespace fastlatent
