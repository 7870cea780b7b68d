// CPU group_norm forward and backward (see group_norm.h).
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
#include "group_norm.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "dispatch.h"

namespace fastlatent {
namespace {

constexpr int64_t kBlock = 2048;            // values per fp32 partial sum (channels-first)
constexpr int64_t kPositionsPerTask = 128;  // positions per task (channels-last)

inline int64_t tasks_of(int64_t s) { return (s + kPositionsPerTask - 1) / kPositionsPerTask; }

// 16-bit storage and fp32 buffers (see common.h, to_float_n). Measured one thread, 1x512x64x64
// and 4x256x64x64, SiLU:
// - fp16 loads go through a buffer of kStage values converted in one go (F16C where built with
//   it); bf16 loads stay in the loops (one shift per value; staged, the backward's sums were slower).
// - fp16 results go to a buffer and are rounded in one go; so do bf16 results in the forward,
//   whose activation makes the loop heavy (bf16 forward 0.90 -> 0.72 ms at 1x512x64x64), but not
//   in the backward's dx loops (staged: bf16 backward 2.3 -> 2.65 ms at 4x256x64x64).
// - fp32/fp64 are read and written in place.
// kStage divides kBlock, so the backward's fp32 partial sums keep their blocks.
constexpr int64_t kStage = 512;
template <typename T>
constexpr bool kStageLoads = std::is_same_v<T, Half>;
template <typename T, bool Backward = false>
constexpr bool kStageStores = std::is_same_v<T, Half> || (!Backward && std::is_same_v<T, BFloat16>);
template <typename T>
constexpr int64_t kStageBuffer = std::is_same_v<T, math_t<T>> ? 1 : kStage;  // buffer length
template <typename T>
using loaded_t = std::conditional_t<kStageLoads<T>, math_t<T>, T>;  // what load_stage points at

// Values per step of a loop over n values that reads T (and with Stores, writes it): kStage where
// that goes through buffers, all n otherwise.
template <typename T, bool Stores, bool Backward = false>
inline int64_t stage_step(int64_t n) {
  return kStageLoads<T> || (Stores && kStageStores<T, Backward>) ? kStage : std::max<int64_t>(n, 1);
}

// src[0, n) as the loops read it (through to_math): src itself, or buf holding its fp32 values.
template <typename T>
inline const loaded_t<T>* load_stage(const T* src, math_t<T>* buf, int64_t n) {
  if constexpr (kStageLoads<T>) {
    to_float_n(src, buf, n);
    return buf;
  } else {
    return src;
  }
}

// Where the loops write results for dst (through from_math<element type>): dst itself, or buf,
// which store_stage then rounds into dst.
template <bool Backward = false, typename T>
inline auto stage_target(T* dst, math_t<T>* buf) {
  if constexpr (kStageStores<T, Backward>) return buf; else return dst;
}

template <bool Backward = false, typename T, typename V>
inline void store_stage(const V* buf, T* dst, int64_t n) {
  if constexpr (kStageStores<T, Backward>) from_float_n(buf, dst, n);
}

constexpr bool kBackward = true;  // the Backward argument of the backward's dx loops

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

// scale[n, c] = rstd * w and shift[n, c] = b, applied as (x - mean) * scale + shift: centring
// first keeps x_hat exact when |mean| >> std (x * scale + (b - mean * scale) cancels there).
// Weights are F.
template <typename F, typename S>
void affine_per_channel(const S* rstd, const void* weight_ptr, const void* bias_ptr, int64_t n, int64_t c,
                        int64_t groups, std::vector<F>& scale, std::vector<F>& shift) {
  const F* weight = static_cast<const F*>(weight_ptr);
  const F* bias = static_cast<const F*>(bias_ptr);
  const int64_t per_group = c / groups;
  scale.resize(n * c);
  shift.resize(n * c);
  // Nested loops, no per-channel integer division: with many small maps (n * c in the tens of
  // thousands) the divisions alone cost as much as the data passes.
  for (int64_t sample = 0; sample < n; ++sample)
    for (int64_t g = 0; g < groups; ++g) {
      const F r = F(rstd[sample * groups + g]);
      for (int64_t ch = g * per_group; ch < (g + 1) * per_group; ++ch) {
        scale[sample * c + ch] = r * (weight ? weight[ch] : F(1));
        shift[sample * c + ch] = bias ? bias[ch] : F(0);
      }
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

// Channels-first with groups small enough to stay in L2: each task reads its group for the
// statistics and applies the norm while the group is still cached, so x comes from memory
// once. A channels-first group is one contiguous run of per_group * s values, so its shifted
// sums are taken over the whole run with the group's first value as the shift: one Chan step
// instead of one per channel (for small maps, 64x512x8x8, the per-channel double divisions
// cost more than reading the data). The shift lies inside the group's range, so the variance
// is as well conditioned as with per-channel shifts; results agree with the two-pass path to
// rounding.
constexpr int64_t kFusedGroupBytes = 384 * 1024;

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

// One channels-first plane of s values: s1 = sum dz and s2 = sum dz * x_hat, dz = dy * act'(x_hat * w + b)
// (= (x - mu) * scale + shift), in fp32 over blocks of kBlock values and double across them; with
// StoreDz, dz goes to dz_out[0, s) too.
template <typename T, Activation A, bool StoreDz>
inline void plane_grad_sums(const T* xp, const T* dyp, int64_t s, math_t<T> mu, math_t<T> r, math_t<T> sc,
                            math_t<T> sh, math_t<T>* dz_out, double& s1_out, double& s2_out) {
  using F = math_t<T>;
  alignas(64) F x_buf[kStageBuffer<T>], dy_buf[kStageBuffer<T>];
  double s1 = 0.0, s2 = 0.0;
  for (int64_t p0 = 0; p0 < s; p0 += kBlock) {
    const int64_t p_end = std::min(s, p0 + kBlock);
    F a = 0, b = 0;
    const int64_t step = stage_step<T, false>(p_end - p0);
    for (int64_t q0 = p0; q0 < p_end; q0 += step) {
      const int64_t m = std::min(step, p_end - q0);
      const loaded_t<T>* __restrict xs = load_stage(xp + q0, x_buf, m);
      const loaded_t<T>* __restrict dys = load_stage(dyp + q0, dy_buf, m);
      F* __restrict dz = StoreDz ? dz_out + q0 : nullptr;
      F sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
      for (int64_t q = 0; q < m; ++q) {
        const F v = to_math(xs[q]) - mu;
        const F d = to_math(dys[q]) * activate_grad<A>(v * sc + sh);
        if constexpr (StoreDz) dz[q] = d;
        sa += d;
        sb += d * v * r;
      }
      a += sa;
      b += sb;
    }
    s1 += a;
    s2 += b;
  }
  s1_out = s1;
  s2_out = s2;
}

// Channels-first backward with groups small enough to stay in L2 (as forward_fused_groups): each
// task computes its group's dz = dy * act'(.) once into a thread-local buffer while summing P1 and
// P2, then writes dx from the buffer while x is still cached, instead of two passes that each
// recompute the activation's derivative. Same per-plane block sums as the two-pass path.
template <typename T, Activation A>
void backward_fused_groups(const GroupNormBackwardParams& p, const std::vector<math_t<T>>& scale,
                           const std::vector<math_t<T>>& shift, std::vector<double>& p1, std::vector<double>& p2) {
  using F = math_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_out);
  T* dx = static_cast<T*>(p.grad_x);
  const F* weight = static_cast<const F*>(p.weight);
  const int64_t per_group = p.c / p.groups, s = p.s;
  const double inv_m = 1.0 / (static_cast<double>(per_group) * static_cast<double>(s));
#pragma omp parallel
  {
    std::vector<F> dz_buf(per_group * s);
#pragma omp for schedule(static)
    for (int64_t ng = 0; ng < p.n * p.groups; ++ng) {
      const int64_t first_plane = ng * per_group;  // planes of group ng (sample-major, c = groups * per_group)
      const F mu = static_cast<F>(p.mean[ng]), r = static_cast<F>(p.rstd[ng]);
      double a_group = 0.0, b_group = 0.0;
      for (int64_t j = 0; j < per_group; ++j) {
        const int64_t plane = first_plane + j, ch = plane % p.c;
        double s1, s2;
        plane_grad_sums<T, A, true>(x + plane * s, dy + plane * s, s, mu, r, scale[plane], shift[plane],
                                    dz_buf.data() + j * s, s1, s2);
        p1[plane] = s1;
        p2[plane] = s2;
        const double w = weight ? weight[ch] : 1.0;
        a_group += w * s1;
        b_group += w * s2;
      }
      const double rd = p.rstd[ng];
      const F c2 = static_cast<F>(-rd * rd * b_group * inv_m), c3 = static_cast<F>(-rd * a_group * inv_m);
      for (int64_t j = 0; j < per_group; ++j) {
        const int64_t plane = first_plane + j, ch = plane % p.c;
        const F c1 = static_cast<F>(rd * (weight ? weight[ch] : 1.0));
        const T* xp = x + plane * s;
        const F* dz = dz_buf.data() + j * s;
        T* dxp = dx + plane * s;
        alignas(64) F x_buf[kStageBuffer<T>], y_buf[kStageBuffer<T>];
        const int64_t step = stage_step<T, true, kBackward>(s);
        for (int64_t first = 0; first < s; first += step) {
          const int64_t m = std::min(step, s - first);
          const loaded_t<T>* __restrict xs = load_stage(xp + first, x_buf, m);
          const F* __restrict dzs = dz + first;
          auto* __restrict ys = stage_target<kBackward>(dxp + first, y_buf);
          using Y = std::remove_reference_t<decltype(*ys)>;
#pragma omp simd
          for (int64_t q = 0; q < m; ++q) ys[q] = from_math<Y>(dzs[q] * c1 + (to_math(xs[q]) - mu) * c2 + c3);
          store_stage<kBackward>(ys, dxp + first, m);
        }
      }
    }
  }
}

template <typename T, Activation A>
Status backward_typed(const GroupNormBackwardParams& p) {
  using F = math_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_out);
  T* dx = static_cast<T*>(p.grad_x);
  const F* weight = static_cast<const F*>(p.weight);
  const int64_t n = p.n, c = p.c, s = p.s, groups = p.groups, per_group = c / groups;

  std::vector<F> scale, shift, mean_c(n * c), rstd_c(n * c);
  affine_per_channel(p.rstd, p.weight, p.bias, n, c, groups, scale, shift);
  for (int64_t ng = 0; ng < n * groups; ++ng)
    for (int64_t i = ng * per_group; i < (ng + 1) * per_group; ++i) {  // planes of group ng: [ng*pg, (ng+1)*pg)
      mean_c[i] = p.mean[ng];
      rstd_c[i] = p.rstd[ng];
    }

  // P1[n, c] = sum dz, P2[n, c] = sum dz * x_hat, with dz = dy * act'(x * scale + shift).
  std::vector<double> p1(n * c, 0.0), p2(n * c, 0.0);
  const bool fused = p.layout == Layout::kChannelsFirst &&
                     per_group * s * static_cast<int64_t>(sizeof(F)) <= kFusedGroupBytes && n * groups >= 2;
  if (fused) {
    backward_fused_groups<T, A>(p, scale, shift, p1, p2);
  } else if (p.layout == Layout::kChannelsFirst) {
#pragma omp parallel for schedule(static)
    for (int64_t plane = 0; plane < n * c; ++plane)
      plane_grad_sums<T, A, false>(x + plane * s, dy + plane * s, s, mean_c[plane], rstd_c[plane], scale[plane],
                            shift[plane], nullptr, p1[plane], p2[plane]);
  } else {
    const int64_t tasks = tasks_of(s);
    std::vector<F> part_a(n * tasks * c), part_b(n * tasks * c);
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < n * tasks; ++task) {
      const int64_t sample = task / tasks, p0 = (task % tasks) * kPositionsPerTask;
      const int64_t p_end = std::min(s, p0 + kPositionsPerTask);
      F* a = part_a.data() + task * c;
      F* b = part_b.data() + task * c;
      std::fill(a, a + c, F(0));
      std::fill(b, b + c, F(0));
      const F* sc = scale.data() + sample * c;
      const F* sh = shift.data() + sample * c;
      const F* mu = mean_c.data() + sample * c;
      const F* r = rstd_c.data() + sample * c;
      alignas(64) F x_buf[kStageBuffer<T>], dy_buf[kStageBuffer<T>];
      for (int64_t pos = p0; pos < p_end; ++pos) {
        const T* xr = x + (sample * s + pos) * c;
        const T* dyr = dy + (sample * s + pos) * c;
        const int64_t step = stage_step<T, false>(c);
        for (int64_t first = 0; first < c; first += step) {
          const int64_t m = std::min(step, c - first);
          const loaded_t<T>* __restrict xs = load_stage(xr + first, x_buf, m);
          const loaded_t<T>* __restrict dys = load_stage(dyr + first, dy_buf, m);
          F* __restrict as = a + first;
          F* __restrict bs = b + first;
#pragma omp simd
          for (int64_t ch = 0; ch < m; ++ch) {
            const int64_t k = first + ch;
            const F v = to_math(xs[ch]) - mu[k];
            const F dz = to_math(dys[ch]) * activate_grad<A>(v * sc[k] + sh[k]);
            as[ch] += dz;
            bs[ch] += dz * v * r[k];
          }
        }
      }
    }
    for (int64_t sample = 0; sample < n; ++sample)
      for (int64_t task = sample * tasks; task < (sample + 1) * tasks; ++task)
        for (int64_t ch = 0; ch < c; ++ch) {
          p1[sample * c + ch] += part_a[task * c + ch];
          p2[sample * c + ch] += part_b[task * c + ch];
        }
  }

  if (p.grad_weight || p.grad_bias) {
    for (int64_t ch = 0; ch < c; ++ch) {
      double gw = 0.0, gb = 0.0;
      for (int64_t sample = 0; sample < n; ++sample) {
        gw += p2[sample * c + ch];
        gb += p1[sample * c + ch];
      }
      if (p.grad_weight) p.grad_weight[ch] = static_cast<float>(gw);
      if (p.grad_bias) p.grad_bias[ch] = static_cast<float>(gb);
    }
  }
  if (fused) return Status::Ok();  // dx is written
  // Per channel: dx = rstd * (dz * w - A/m - (x - mean) * rstd * B/m) = dz * k1 + (x - mean) * k2 + k3.
  const double inv_m = 1.0 / static_cast<double>(per_group * s);
  std::vector<F> k1(n * c), k2(n * c), k3(n * c);
  for (int64_t sample = 0; sample < n; ++sample)
    for (int64_t g = 0; g < groups; ++g) {
      double a = 0.0, b = 0.0;
      for (int64_t ch = g * per_group; ch < (g + 1) * per_group; ++ch) {
        const double w = weight ? weight[ch] : 1.0;
        a += w * p1[sample * c + ch];
        b += w * p2[sample * c + ch];
      }
      const double r = p.rstd[sample * groups + g];
      for (int64_t ch = g * per_group; ch < (g + 1) * per_group; ++ch) {
        const double w = weight ? weight[ch] : 1.0;
        k1[sample * c + ch] = static_cast<F>(r * w);
        k2[sample * c + ch] = static_cast<F>(-r * r * b * inv_m);
        k3[sample * c + ch] = static_cast<F>(-r * a * inv_m);
      }
    }

  if (p.layout == Layout::kChannelsFirst) {
#pragma omp parallel for schedule(static)
    for (int64_t plane = 0; plane < n * c; ++plane) {
      const T* xp = x + plane * s;
      const T* dyp = dy + plane * s;
      T* dxp = dx + plane * s;
      const F sc = scale[plane], sh = shift[plane], mu = mean_c[plane];
      const F c1 = k1[plane], c2 = k2[plane], c3 = k3[plane];
      alignas(64) F x_buf[kStageBuffer<T>], dy_buf[kStageBuffer<T>], y_buf[kStageBuffer<T>];
      const int64_t step = stage_step<T, true, kBackward>(s);
      for (int64_t first = 0; first < s; first += step) {
        const int64_t m = std::min(step, s - first);
        const loaded_t<T>* __restrict xs = load_stage(xp + first, x_buf, m);
        const loaded_t<T>* __restrict dys = load_stage(dyp + first, dy_buf, m);
        auto* __restrict ys = stage_target<kBackward>(dxp + first, y_buf);
        using Y = std::remove_reference_t<decltype(*ys)>;
#pragma omp simd
        for (int64_t q = 0; q < m; ++q) {
          const F v = to_math(xs[q]) - mu;
          const F dz = to_math(dys[q]) * activate_grad<A>(v * sc + sh);
          ys[q] = from_math<Y>(dz * c1 + v * c2 + c3);
        }
        store_stage<kBackward>(ys, dxp + first, m);
      }
    }
  } else {
    const int64_t tasks = tasks_of(s);
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < n * tasks; ++task) {
      const int64_t sample = task / tasks, p0 = (task % tasks) * kPositionsPerTask;
      const int64_t p_end = std::min(s, p0 + kPositionsPerTask);
      const F* sc = scale.data() + sample * c;
      const F* sh = shift.data() + sample * c;
      const F* c1 = k1.data() + sample * c;
      const F* c2 = k2.data() + sample * c;
      const F* c3 = k3.data() + sample * c;
      const F* mu = mean_c.data() + sample * c;
      alignas(64) F x_buf[kStageBuffer<T>], dy_buf[kStageBuffer<T>], y_buf[kStageBuffer<T>];
      for (int64_t pos = p0; pos < p_end; ++pos) {
        const int64_t e = (sample * s + pos) * c;
        const int64_t step = stage_step<T, true, kBackward>(c);
        for (int64_t first = 0; first < c; first += step) {
          const int64_t m = std::min(step, c - first);
          const loaded_t<T>* __restrict xs = load_stage(x + e + first, x_buf, m);
          const loaded_t<T>* __restrict dys = load_stage(dy + e + first, dy_buf, m);
          auto* __restrict ys = stage_target<kBackward>(dx + e + first, y_buf);
          using Y = std::remove_reference_t<decltype(*ys)>;
#pragma omp simd
          for (int64_t ch = 0; ch < m; ++ch) {
            const int64_t k = first + ch;
            const F v = to_math(xs[ch]) - mu[k];
            const F dz = to_math(dys[ch]) * activate_grad<A>(v * sc[k] + sh[k]);
            ys[ch] = from_math<Y>(dz * c1[k] + v * c2[k] + c3[k]);
          }
          store_stage<kBackward>(ys, dx + e + first, m);
        }
      }
    }
  }
  return Status::Ok();
}

Status check_sizes(int64_t n, int64_t c, int64_t s, int64_t groups) {
  if (n < 0 || c < 1 || s < 0 || groups < 1 || c % groups != 0)
    return Status::Error("group_norm: need n >= 0, c >= 1, s >= 0, groups >= 1 dividing c");
  return Status::Ok();
}

}  // namespace

Status run_group_norm_cpu(const GroupNormParams& p) {
  const Status sizes = check_sizes(p.n, p.c, p.s, p.groups);
  if (!sizes.ok) return sizes;
  if (p.n == 0 || p.s == 0) return Status::Ok();
  return FL_DTYPE_SWITCH_WITH_DOUBLE(p.dtype, scalar_t, Status::Error("group_norm: unsupported dtype"), [&] {
    return FL_ACTIVATION_SWITCH(p.activation, kAct, [&] { return forward_typed<scalar_t, kAct>(p); });
  });
}

Status run_group_norm_stats_cpu(const GroupNormStatsParams& p) {
  const Status sizes = check_sizes(p.n, p.c, p.s, p.groups);
  if (!sizes.ok) return sizes;
  if (p.n == 0) return Status::Ok();
  if (p.s == 0) {  // an empty part: mean 0, M2 0 (merges as a part of count 0)
    std::fill(p.mean, p.mean + p.n * p.groups, 0.0f);
    std::fill(p.m2, p.m2 + p.n * p.groups, 0.0f);
    return Status::Ok();
  }
  return FL_DTYPE_SWITCH_WITH_DOUBLE(p.dtype, scalar_t, Status::Error("group_norm_stats: unsupported dtype"),
                                     [&] { return stats_typed<scalar_t>(p); });
}

Status run_group_norm_apply_cpu(const GroupNormApplyParams& p) {
  const Status sizes = check_sizes(p.n, p.c, p.s, p.groups);
  if (!sizes.ok) return sizes;
  if (p.n == 0 || p.s == 0) return Status::Ok();
  return FL_DTYPE_SWITCH_WITH_DOUBLE(p.dtype, scalar_t, Status::Error("group_norm_apply: unsupported dtype"), [&] {
    return FL_ACTIVATION_SWITCH(p.activation, kAct, [&] { return apply_typed<scalar_t, kAct>(p); });
  });
}

Status run_group_norm_backward_cpu(const GroupNormBackwardParams& p) {
  const Status sizes = check_sizes(p.n, p.c, p.s, p.groups);
  if (!sizes.ok) return sizes;
  if (p.n == 0 || p.s == 0) {
    for (int64_t ch = 0; ch < p.c; ++ch) {
      if (p.grad_weight) p.grad_weight[ch] = 0.0f;
      if (p.grad_bias) p.grad_bias[ch] = 0.0f;
    }
    return Status::Ok();
  }
  return FL_DTYPE_SWITCH_WITH_DOUBLE(p.dtype, scalar_t, Status::Error("group_norm_backward: unsupported dtype"), [&] {
    return FL_ACTIVATION_SWITCH(p.activation, kAct, [&] { return backward_typed<scalar_t, kAct>(p); });
  });
}

}  // namespace fastlatent
