// CPU group_norm forward, group_norm_stats and group_norm_apply (see group_norm.h); the backward is in
// group_norm_cpu_backward.cpp, what both share in group_norm_cpu_staging.h.
//
// Channels-first: one task per (sample, channel) plane over its contiguous positions.
// Channels-last: one task per (sample, block of positions), vectorised across the contiguous
// channels, with per-channel partials merged in a fixed order.
//
// Statistics: per channel, sums of (x - shift) and (x - shift)^2 with the channel's first
// value as the shift (so a large mean doesn't cancel the variance away), in fp32 over blocks
// of at most kBlock values (vectorised with omp simd reductions) and in double across
// blocks; channels are combined per group with Chan's formula in double. The backward's
// per-channel sums take the same route. Results don't depend on the thread count.
// group_norm_stats and group_norm_apply are the two halves of the two-pass path.
//
// fp16/bf16: the elementwise passes convert blocks of kStage values to and from fp32 buffers
// (to_float_n, from_float_n) where that measured faster than converting inside the loops (see
// kStage); fp32 and fp64 run in place.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "group_norm_cpu_staging.h"

namespace fastlatent {
namespace {

using namespace group_norm_cpu;

// Per-channel shifted sums: s1 = sum (x - shift), s2 = sum (x - shift)^2, shift = first value.
struct ChannelSums {
  std::vector<double> s1, s2, shift;
};

// Shifted sums of one contiguous plane of s values.
template <typename T>
inline void plane_sums(const T* xp, int64_t s, double& s1_out, double& s2_out, double& shift_out) {
  using F = math_t<T>;
  const F shift = to_math(xp[0]);
  alignas(64) F x_buf[kStageBuffer<T>];
  double s1 = 0.0, s2 = 0.0;
  for (int64_t p0 = 0; p0 < s; p0 += kBlock) {
    const int64_t p1 = std::min(s, p0 + kBlock);
    F a = 0, b = 0;
    const int64_t step = stage_step<T, false>(p1 - p0);
    for (int64_t q0 = p0; q0 < p1; q0 += step) {
      const int64_t m = std::min(step, p1 - q0);
      const loaded_t<T>* __restrict xs = load_stage(xp + q0, x_buf, m);
      F sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
      for (int64_t q = 0; q < m; ++q) {
        const F v = to_math(xs[q]) - shift;
        sa += v;
        sb += v * v;
      }
      a += sa;
      b += sb;
    }
    s1 += a;
    s2 += b;
  }
  s1_out = s1;
  s2_out = s2;
  shift_out = shift;
}

template <typename T>
void channel_sums(const T* x, int64_t n, int64_t c, int64_t s, Layout layout, ChannelSums& out) {
  using F = math_t<T>;
  out.s1.assign(n * c, 0.0);
  out.s2.assign(n * c, 0.0);
  out.shift.assign(n * c, 0.0);
  if (layout == Layout::kChannelsFirst) {
#pragma omp parallel for schedule(static)
    for (int64_t plane = 0; plane < n * c; ++plane)
      plane_sums(x + plane * s, s, out.s1[plane], out.s2[plane], out.shift[plane]);
    return;
  }
  const int64_t tasks = tasks_of(s);
  std::vector<F> part_a(n * tasks * c), part_b(n * tasks * c), shifts(n * c);
  for (int64_t sample = 0; sample < n; ++sample)  // each channel's shift: its value at position 0
    for (int64_t ch = 0; ch < c; ++ch) shifts[sample * c + ch] = to_math(x[sample * s * c + ch]);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < n * tasks; ++task) {
    const int64_t sample = task / tasks, p0 = (task % tasks) * kPositionsPerTask;
    const int64_t p1 = std::min(s, p0 + kPositionsPerTask);
    const F* shift = shifts.data() + sample * c;
    F* a = part_a.data() + task * c;
    F* b = part_b.data() + task * c;
    std::fill(a, a + c, F(0));
    std::fill(b, b + c, F(0));
    alignas(64) F x_buf[kStageBuffer<T>];
    const int64_t step = stage_step<T, false>(c);
    for (int64_t p = p0; p < p1; ++p) {
      const T* row = x + (sample * s + p) * c;
      for (int64_t first = 0; first < c; first += step) {
        const int64_t m = std::min(step, c - first);
        const loaded_t<T>* __restrict xs = load_stage(row + first, x_buf, m);
        F* __restrict as = a + first;
        F* __restrict bs = b + first;
        const F* __restrict sh = shift + first;
#pragma omp simd
        for (int64_t ch = 0; ch < m; ++ch) {
          const F v = to_math(xs[ch]) - sh[ch];
          as[ch] += v;
          bs[ch] += v * v;
        }
      }
    }
  }
  for (int64_t sample = 0; sample < n; ++sample)
    for (int64_t ch = 0; ch < c; ++ch) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t task = sample * tasks; task < (sample + 1) * tasks; ++task) {
        s1 += part_a[task * c + ch];
        s2 += part_b[task * c + ch];
      }
      out.s1[sample * c + ch] = s1;
      out.s2[sample * c + ch] = s2;
      out.shift[sample * c + ch] = shifts[sample * c + ch];
    }
}


// out = act((x - center) * scale + shift) (+ residual) over one contiguous run of one channel.
template <typename T, Activation A, bool Residual>
inline void apply_run(const T* x, const T* residual, T* out, int64_t count, math_t<T> center, math_t<T> scale,
                      math_t<T> shift) {
  using F = math_t<T>;
  alignas(64) F x_buf[kStageBuffer<T>], r_buf[kStageBuffer<T>], y_buf[kStageBuffer<T>];
  const int64_t step = stage_step<T, true>(count);
  for (int64_t first = 0; first < count; first += step) {
    const int64_t m = std::min(step, count - first);
    const loaded_t<T>* __restrict xs = load_stage(x + first, x_buf, m);
    const loaded_t<T>* __restrict rs = Residual ? load_stage(residual + first, r_buf, m) : nullptr;
    F* __restrict ys = stage_target(out + first, y_buf);
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      F y = activate<A>((to_math(xs[i]) - center) * scale + shift);
      if constexpr (Residual) y += to_math(rs[i]);
      ys[i] = y;
    }
    store_stage(ys, out + first, m);
  }
}

// The same over one channels-last row: channel ch uses center[ch], scale[ch], shift[ch].
template <typename T, Activation A, bool Residual>
inline void apply_row(const T* x, const T* residual, T* out, int64_t c, const math_t<T>* center,
                      const math_t<T>* scale, const math_t<T>* shift) {
  using F = math_t<T>;
  alignas(64) F x_buf[kStageBuffer<T>], r_buf[kStageBuffer<T>], y_buf[kStageBuffer<T>];
  const int64_t step = stage_step<T, true>(c);
  for (int64_t first = 0; first < c; first += step) {
    const int64_t m = std::min(step, c - first);
    const loaded_t<T>* __restrict xs = load_stage(x + first, x_buf, m);
    const loaded_t<T>* __restrict rs = Residual ? load_stage(residual + first, r_buf, m) : nullptr;
    F* __restrict ys = stage_target(out + first, y_buf);
    const F* __restrict ce = center + first;
    const F* __restrict sc = scale + first;
    const F* __restrict sh = shift + first;
#pragma omp simd
    for (int64_t ch = 0; ch < m; ++ch) {
      F y = activate<A>((to_math(xs[ch]) - ce[ch]) * sc[ch] + sh[ch]);
      if constexpr (Residual) y += to_math(rs[ch]);
      ys[ch] = y;
    }
    store_stage(ys, out + first, m);
  }
}

// The elementwise pass over a whole tensor: x, residual (or null) and out of element type T.
struct Elementwise {
  const void* x;
  const void* residual;
  void* out;
  int64_t n, c, s;
  Layout layout;
};

template <typename T, Activation A, bool Residual>
void apply_forward(const Elementwise& p, const std::vector<math_t<T>>& center,
                   const std::vector<math_t<T>>& scale, const std::vector<math_t<T>>& shift) {
  const T* x = static_cast<const T*>(p.x);
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  const int64_t n = p.n, c = p.c, s = p.s;
  if (p.layout == Layout::kChannelsFirst) {
#pragma omp parallel for schedule(static)
    for (int64_t plane = 0; plane < n * c; ++plane)
      apply_run<T, A, Residual>(x + plane * s, Residual ? residual + plane * s : nullptr, out + plane * s, s,
                                center[plane], scale[plane], shift[plane]);
    return;
  }
  const int64_t tasks = tasks_of(s);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < n * tasks; ++task) {
    const int64_t sample = task / tasks, p0 = (task % tasks) * kPositionsPerTask;
    const int64_t p1 = std::min(s, p0 + kPositionsPerTask);
    for (int64_t pos = p0; pos < p1; ++pos) {
      const int64_t e = (sample * s + pos) * c;
      apply_row<T, A, Residual>(x + e, Residual ? residual + e : nullptr, out + e, c, center.data() + sample * c,
                                scale.data() + sample * c, shift.data() + sample * c);
    }
  }
}

// Chan's combination of a group's per-channel shifted sums, in double: (mean, M2).
inline void group_mean_m2(const double* s1, const double* s2, const double* shift, int64_t channels, int64_t s,
                          double& mean_out, double& m2_out) {
  const double per_channel = static_cast<double>(s);
  double count = 0.0, mean = 0.0, m2 = 0.0;
  for (int64_t ch = 0; ch < channels; ++ch) {
    const double channel_mean = shift[ch] + s1[ch] / per_channel;
    const double channel_m2 = std::max(0.0, s2[ch] - s1[ch] * s1[ch] / per_channel);
    const double total = count + per_channel, delta = channel_mean - mean;
    mean += delta * (per_channel / total);
    m2 += channel_m2 + delta * delta * (count * per_channel / total);
    count = total;
  }
  mean_out = mean;
  m2_out = m2;
}

// The same, as (mean, rstd).
inline void group_moments(const double* s1, const double* s2, const double* shift, int64_t channels, int64_t s,
                          double eps, double& mean_out, double& rstd_out) {
  double m2;
  group_mean_m2(s1, s2, shift, channels, s, mean_out, m2);
  rstd_out = 1.0 / std::sqrt(m2 / (static_cast<double>(channels) * static_cast<double>(s)) + eps);
}


template <typename T, Activation A, bool Residual>
void forward_fused_groups(const GroupNormParams& p) {
  using F = math_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  const F* weight = static_cast<const F*>(p.weight);
  const F* bias = static_cast<const F*>(p.bias);
  const int64_t per_group = p.c / p.groups, s = p.s;
  const double count = static_cast<double>(per_group) * static_cast<double>(s);
#pragma omp parallel for schedule(static)
  for (int64_t ng = 0; ng < p.n * p.groups; ++ng) {
    const int64_t first_plane = (ng / p.groups) * p.c + (ng % p.groups) * per_group;
    double s1, s2, shift;
    plane_sums(x + first_plane * s, per_group * s, s1, s2, shift);
    const double mean = shift + s1 / count;
    const double rstd = 1.0 / std::sqrt(std::max(0.0, s2 - s1 * s1 / count) / count + p.eps);
    p.mean[ng] = static_cast<float>(mean);
    p.rstd[ng] = static_cast<float>(rstd);
    for (int64_t j = 0; j < per_group; ++j) {
      const int64_t plane = first_plane + j, ch = plane % p.c;
      const F w = weight ? weight[ch] : F(1), b = bias ? bias[ch] : F(0);
      apply_run<T, A, Residual>(x + plane * s, Residual ? residual + plane * s : nullptr, out + plane * s, s,
                                static_cast<F>(mean), static_cast<F>(rstd) * w, b);
    }
  }
}

template <typename T, Activation A>
Status forward_typed(const GroupNormParams& p) {
  using F = math_t<T>;
  const int64_t per_group = p.c / p.groups;
  if (p.layout == Layout::kChannelsFirst &&
      per_group * p.s * static_cast<int64_t>(sizeof(T)) <= kFusedGroupBytes && p.n * p.groups >= 2) {
    FL_BOOL_SWITCH(p.residual != nullptr, kResidual, [&] { forward_fused_groups<T, A, kResidual>(p); });
    return Status::Ok();
  }
  ChannelSums sums;
  channel_sums(static_cast<const T*>(p.x), p.n, p.c, p.s, p.layout, sums);

  // Chan's combination of the per-channel moments, in double. The output uses these double
  // statistics; fp32 copies are returned for the backward (a float64 forward must be smooth
  // enough for gradcheck).
  std::vector<double> mean(p.n * p.groups), rstd(p.n * p.groups);
  for (int64_t sample = 0; sample < p.n; ++sample)
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t i = sample * p.groups + g, first = sample * p.c + g * per_group;
      group_moments(sums.s1.data() + first, sums.s2.data() + first, sums.shift.data() + first, per_group, p.s, p.eps,
                    mean[i], rstd[i]);
      p.mean[i] = static_cast<float>(mean[i]);
      p.rstd[i] = static_cast<float>(rstd[i]);
    }

  std::vector<F> scale, shift, center(p.n * p.c);
  affine_per_channel(rstd.data(), p.weight, p.bias, p.n, p.c, p.groups, scale, shift);
  for (int64_t i = 0; i < p.n * p.c; ++i) center[i] = static_cast<F>(mean[i / per_group]);  // plane i is in group i / pg
  const Elementwise e{p.x, p.residual, p.out, p.n, p.c, p.s, p.layout};
  FL_BOOL_SWITCH(p.residual != nullptr, kResidual, [&] { apply_forward<T, A, kResidual>(e, center, scale, shift); });
  return Status::Ok();
}

template <typename T>
Status stats_typed(const GroupNormStatsParams& p) {
  ChannelSums sums;
  channel_sums(static_cast<const T*>(p.x), p.n, p.c, p.s, p.layout, sums);
  const int64_t per_group = p.c / p.groups;
  for (int64_t sample = 0; sample < p.n; ++sample)
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t i = sample * p.groups + g, first = sample * p.c + g * per_group;
      double mean, m2;
      group_mean_m2(sums.s1.data() + first, sums.s2.data() + first, sums.shift.data() + first, per_group, p.s, mean,
                    m2);
      p.mean[i] = static_cast<float>(mean);
      p.m2[i] = static_cast<float>(m2);
    }
  return Status::Ok();
}

template <typename T, Activation A>
Status apply_typed(const GroupNormApplyParams& p) {
  using F = math_t<T>;
  const int64_t per_group = p.c / p.groups;
  std::vector<F> scale, shift, center(p.n * p.c);
  affine_per_channel(p.rstd, p.weight, p.bias, p.n, p.c, p.groups, scale, shift);
  for (int64_t i = 0; i < p.n * p.c; ++i) center[i] = static_cast<F>(p.mean[i / per_group]);
  const Elementwise e{p.x, nullptr, p.out, p.n, p.c, p.s, p.layout};
  apply_forward<T, A, false>(e, center, scale, shift);
  return Status::Ok();
}

}  // namespace

Status run_group_norm_cpu(const GroupNormParams& p) {
  return run_checked(p, "group_norm: unsupported dtype", [] { return Status::Ok(); }, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return FL_ACTIVATION_SWITCH(p.activation, kAct, [&] { return forward_typed<T, kAct>(p); });
  });
}

Status run_group_norm_stats_cpu(const GroupNormStatsParams& p) {
  auto empty = [&] {  // no positions: mean 0, M2 0 (merges as a part of count 0); no samples: nothing
    std::fill(p.mean, p.mean + p.n * p.groups, 0.0f);
    std::fill(p.m2, p.m2 + p.n * p.groups, 0.0f);
    return Status::Ok();
  };
  return run_checked(p, "group_norm_stats: unsupported dtype", empty, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return stats_typed<T>(p);
  });
}

Status run_group_norm_apply_cpu(const GroupNormApplyParams& p) {
  return run_checked(p, "group_norm_apply: unsupported dtype", [] { return Status::Ok(); }, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return FL_ACTIVATION_SWITCH(p.activation, kAct, [&] { return apply_typed<T, kAct>(p); });
  });
}

}  // namespace fastlatent
