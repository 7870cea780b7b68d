// CPU group_norm backward (see group_norm.h; the method is described in group_norm_cpu_forward.cpp).
// dz = dy * act'(x_hat * w + b); per channel P1 = sum dz and P2 = sum dz * x_hat (same block sums as
// the forward statistics), the affine gradients from them, then dx = dz * k1 + (x - mean) * k2 + k3
// per channel. Small channels-first groups do it in one pass that keeps dz in a thread-local buffer.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "group_norm_cpu_staging.h"

namespace fastlatent {
namespace {

using namespace group_norm_cpu;

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

// Per-channel copies of the group statistics and the affine coefficients, read by every pass.
template <typename F>
struct BackwardChannels {
  std::vector<F> scale, shift, mean, rstd;  // [n, c]
};

template <typename F>
BackwardChannels<F> backward_channels(const GroupNormBackwardParams& p) {
  const int64_t n = p.n, c = p.c, groups = p.groups, per_group = c / groups;
  BackwardChannels<F> ch;
  affine_per_channel(p.rstd, p.weight, p.bias, n, c, groups, ch.scale, ch.shift);
  ch.mean.resize(n * c);
  ch.rstd.resize(n * c);
  for (int64_t ng = 0; ng < n * groups; ++ng)
    for (int64_t i = ng * per_group; i < (ng + 1) * per_group; ++i) {  // planes of group ng: [ng*pg, (ng+1)*pg)
      ch.mean[i] = p.mean[ng];
      ch.rstd[i] = p.rstd[ng];
    }
  return ch;
}

// Channels-last P1[n, c] = sum dz and P2[n, c] = sum dz * x_hat: per-task fp32 partials over
// kPositionsPerTask positions, vectorised across the channels, merged in task order.
template <typename T, Activation A>
void channels_last_grad_sums(const GroupNormBackwardParams& p, const BackwardChannels<math_t<T>>& chan,
                             std::vector<double>& p1, std::vector<double>& p2) {
  using F = math_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_out);
  const int64_t n = p.n, c = p.c, s = p.s;
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
    const F* sc = chan.scale.data() + sample * c;
    const F* sh = chan.shift.data() + sample * c;
    const F* mu = chan.mean.data() + sample * c;
    const F* r = chan.rstd.data() + sample * c;
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

// grad_weight[c] = sum over samples of P2, grad_bias[c] = sum of P1 (each optional).
inline void write_affine_grads(const GroupNormBackwardParams& p, const std::vector<double>& p1,
                               const std::vector<double>& p2) {
  if (!p.grad_weight && !p.grad_bias) return;
  for (int64_t ch = 0; ch < p.c; ++ch) {
    double gw = 0.0, gb = 0.0;
    for (int64_t sample = 0; sample < p.n; ++sample) {
      gw += p2[sample * p.c + ch];
      gb += p1[sample * p.c + ch];
    }
    if (p.grad_weight) p.grad_weight[ch] = static_cast<float>(gw);
    if (p.grad_bias) p.grad_bias[ch] = static_cast<float>(gb);
  }
}

// Per channel: dx = rstd * (dz * w - A/m - (x - mean) * rstd * B/m) = dz * k1 + (x - mean) * k2 + k3,
// with A, B the group's w-weighted sums of P1, P2 and m its element count.
template <typename F>
struct DxCoefficients {
  std::vector<F> k1, k2, k3;  // [n, c]
};

template <typename F>
DxCoefficients<F> dx_coefficients(const GroupNormBackwardParams& p, const std::vector<double>& p1,
                                  const std::vector<double>& p2) {
  const F* weight = static_cast<const F*>(p.weight);
  const int64_t n = p.n, c = p.c, groups = p.groups, per_group = c / groups;
  const double inv_m = 1.0 / static_cast<double>(per_group * p.s);
  DxCoefficients<F> k{std::vector<F>(n * c), std::vector<F>(n * c), std::vector<F>(n * c)};
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
        k.k1[sample * c + ch] = static_cast<F>(r * w);
        k.k2[sample * c + ch] = static_cast<F>(-r * r * b * inv_m);
        k.k3[sample * c + ch] = static_cast<F>(-r * a * inv_m);
      }
    }
  return k;
}

// dx over the whole tensor from the coefficients (recomputing dz), one task per plane
// (channels-first) or per block of positions vectorised across channels (channels-last).
template <typename T, Activation A>
void write_dx(const GroupNormBackwardParams& p, const BackwardChannels<math_t<T>>& chan,
              const DxCoefficients<math_t<T>>& k) {
  using F = math_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_out);
  T* dx = static_cast<T*>(p.grad_x);
  const int64_t n = p.n, c = p.c, s = p.s;
  if (p.layout == Layout::kChannelsFirst) {
#pragma omp parallel for schedule(static)
    for (int64_t plane = 0; plane < n * c; ++plane) {
      const T* xp = x + plane * s;
      const T* dyp = dy + plane * s;
      T* dxp = dx + plane * s;
      const F sc = chan.scale[plane], sh = chan.shift[plane], mu = chan.mean[plane];
      const F c1 = k.k1[plane], c2 = k.k2[plane], c3 = k.k3[plane];
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
    return;
  }
  const int64_t tasks = tasks_of(s);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < n * tasks; ++task) {
    const int64_t sample = task / tasks, p0 = (task % tasks) * kPositionsPerTask;
    const int64_t p_end = std::min(s, p0 + kPositionsPerTask);
    const F* sc = chan.scale.data() + sample * c;
    const F* sh = chan.shift.data() + sample * c;
    const F* c1 = k.k1.data() + sample * c;
    const F* c2 = k.k2.data() + sample * c;
    const F* c3 = k.k3.data() + sample * c;
    const F* mu = chan.mean.data() + sample * c;
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
          const int64_t kk = first + ch;
          const F v = to_math(xs[ch]) - mu[kk];
          const F dz = to_math(dys[ch]) * activate_grad<A>(v * sc[kk] + sh[kk]);
          ys[ch] = from_math<Y>(dz * c1[kk] + v * c2[kk] + c3[kk]);
        }
        store_stage<kBackward>(ys, dx + e + first, m);
      }
    }
  }
}

// P1/P2 (fused with dx for small channels-first groups), the affine gradients, then dx.
template <typename T, Activation A>
Status backward_typed(const GroupNormBackwardParams& p) {
  using F = math_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_out);
  const int64_t n = p.n, c = p.c, s = p.s, per_group = c / p.groups;
  const BackwardChannels<F> chan = backward_channels<F>(p);
  // P1[n, c] = sum dz, P2[n, c] = sum dz * x_hat, with dz = dy * act'(x * scale + shift).
  std::vector<double> p1(n * c, 0.0), p2(n * c, 0.0);
  const bool fused = p.layout == Layout::kChannelsFirst &&
                     per_group * s * static_cast<int64_t>(sizeof(F)) <= kFusedGroupBytes && n * p.groups >= 2;
  if (fused) {
    backward_fused_groups<T, A>(p, chan.scale, chan.shift, p1, p2);  // writes dx too
  } else if (p.layout == Layout::kChannelsFirst) {
#pragma omp parallel for schedule(static)
    for (int64_t plane = 0; plane < n * c; ++plane)
      plane_grad_sums<T, A, false>(x + plane * s, dy + plane * s, s, chan.mean[plane], chan.rstd[plane],
                                   chan.scale[plane], chan.shift[plane], nullptr, p1[plane], p2[plane]);
  } else {
    channels_last_grad_sums<T, A>(p, chan, p1, p2);
  }
  write_affine_grads(p, p1, p2);
  if (!fused) write_dx<T, A>(p, chan, dx_coefficients<F>(p, p1, p2));
  return Status::Ok();
}

}  // namespace

Status run_group_norm_backward_cpu(const GroupNormBackwardParams& p) {
  auto empty = [&] {  // nothing to normalise: zero affine gradients
    for (int64_t ch = 0; ch < p.c; ++ch) {
      if (p.grad_weight) p.grad_weight[ch] = 0.0f;
      if (p.grad_bias) p.grad_bias[ch] = 0.0f;
    }
    return Status::Ok();
  };
  return run_checked(p, "group_norm_backward: unsupported dtype", empty, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return FL_ACTIVATION_SWITCH(p.activation, kAct, [&] { return backward_typed<T, kAct>(p); });
  });
}

}  // namespace fastlatent
