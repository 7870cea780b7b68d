// CPU group_norm forward and backward (see group_norm.h).
//
// Channels-first: one task per (sample, channel) plane, loops over the contiguous spatial
// run. Channels-last: one task per (sample, block of positions), loops over the contiguous
// channels with per-channel partials; blocks are merged in a fixed order. Every reduction
// runs in double, so the statistics don't depend on the thread count.
#include "group_norm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "dispatch.h"

namespace fastlatent {
namespace {

constexpr int64_t kPositionsPerTask = 256;  // channels-last: positions per task

inline int64_t blocks_of(int64_t s) { return (s + kPositionsPerTask - 1) / kPositionsPerTask; }

// sums[n * c + ch] += over positions of f(n, ch, position): the two reduction shapes the
// forward and backward need, for both layouts. f returns {a, b}; both are summed.
template <typename T, typename F>
void reduce_per_channel(Layout layout, int64_t n, int64_t c, int64_t s, std::vector<double>& sum_a,
                        std::vector<double>& sum_b, F&& f) {
  sum_a.assign(n * c, 0.0);
  sum_b.assign(n * c, 0.0);
  if (layout == Layout::kChannelsFirst) {
#pragma omp parallel for schedule(static)
    for (int64_t plane = 0; plane < n * c; ++plane) {
      double a = 0.0, b = 0.0;
      for (int64_t p = 0; p < s; ++p) {
        const auto [va, vb] = f(plane / c, plane % c, plane * s + p);
        a += va;
        b += vb;
      }
      sum_a[plane] = a;
      sum_b[plane] = b;
    }
    return;
  }
  const int64_t blocks = blocks_of(s);
  std::vector<double> part_a(n * blocks * c), part_b(n * blocks * c);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < n * blocks; ++task) {
    const int64_t sample = task / blocks, block = task % blocks;
    double* pa = part_a.data() + task * c;
    double* pb = part_b.data() + task * c;
    std::fill(pa, pa + c, 0.0);
    std::fill(pb, pb + c, 0.0);
    const int64_t p1 = std::min(s, (block + 1) * kPositionsPerTask);
    for (int64_t p = block * kPositionsPerTask; p < p1; ++p) {
      const int64_t base = (sample * s + p) * c;
      for (int64_t ch = 0; ch < c; ++ch) {
        const auto [va, vb] = f(sample, ch, base + ch);
        pa[ch] += va;
        pb[ch] += vb;
      }
    }
  }
  for (int64_t sample = 0; sample < n; ++sample)
    for (int64_t block = 0; block < blocks; ++block)
      for (int64_t ch = 0; ch < c; ++ch) {
        sum_a[sample * c + ch] += part_a[(sample * blocks + block) * c + ch];
        sum_b[sample * c + ch] += part_b[(sample * blocks + block) * c + ch];
      }
}

// out[e] = g(n, ch, e) for every element, in the layout's natural order.
template <typename F>
void for_each_element(Layout layout, int64_t n, int64_t c, int64_t s, F&& g) {
  if (layout == Layout::kChannelsFirst) {
#pragma omp parallel for schedule(static)
    for (int64_t plane = 0; plane < n * c; ++plane)
      for (int64_t p = 0; p < s; ++p) g(plane / c, plane % c, plane * s + p);
    return;
  }
  const int64_t blocks = blocks_of(s);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < n * blocks; ++task) {
    const int64_t sample = task / blocks, block = task % blocks;
    const int64_t p1 = std::min(s, (block + 1) * kPositionsPerTask);
    for (int64_t p = block * kPositionsPerTask; p < p1; ++p) {
      const int64_t base = (sample * s + p) * c;
      for (int64_t ch = 0; ch < c; ++ch) g(sample, ch, base + ch);
    }
  }
}

// scale[n, c] and shift[n, c] such that x * scale + shift = x_hat * w + b. Weights are F.
template <typename F, typename S>
void affine_per_channel(const S* mean, const S* rstd, const void* weight_ptr, const void* bias_ptr, int64_t n,
                        int64_t c, int64_t groups, std::vector<F>& scale, std::vector<F>& shift) {
  const F* weight = static_cast<const F*>(weight_ptr);
  const F* bias = static_cast<const F*>(bias_ptr);
  const int64_t per_group = c / groups;
  scale.resize(n * c);
  shift.resize(n * c);
  for (int64_t sample = 0; sample < n; ++sample)
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t g = sample * groups + ch / per_group;
      const F w = weight ? weight[ch] : F(1), b = bias ? bias[ch] : F(0);
      scale[sample * c + ch] = F(rstd[g]) * w;
      shift[sample * c + ch] = b - F(mean[g]) * F(rstd[g]) * w;
    }
}

template <typename T, Activation A>
Status forward_typed(const GroupNormParams& p) {
  using F = math_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  const int64_t per_group = p.c / p.groups;
  const double m = static_cast<double>(per_group) * p.s;

  std::vector<double> sum, sum_sq;
  reduce_per_channel<T>(p.layout, p.n, p.c, p.s, sum, sum_sq, [&](int64_t, int64_t, int64_t e) {
    const double v = to_math(x[e]);
    return std::pair<double, double>{v, v * v};
  });
  // The output uses the double statistics; fp32 copies are returned for the backward. (With
  // fp32 statistics a float64 forward would not be smooth enough for gradcheck.)
  std::vector<double> mean(p.n * p.groups), rstd(p.n * p.groups);
  for (int64_t sample = 0; sample < p.n; ++sample)
    for (int64_t g = 0; g < p.groups; ++g) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t ch = g * per_group; ch < (g + 1) * per_group; ++ch) {
        s1 += sum[sample * p.c + ch];
        s2 += sum_sq[sample * p.c + ch];
      }
      const int64_t i = sample * p.groups + g;
      mean[i] = s1 / m;
      rstd[i] = 1.0 / std::sqrt(std::max(0.0, s2 / m - mean[i] * mean[i]) + p.eps);
      p.mean[i] = static_cast<float>(mean[i]);
      p.rstd[i] = static_cast<float>(rstd[i]);
    }

  std::vector<F> scale, shift;
  affine_per_channel(mean.data(), rstd.data(), p.weight, p.bias, p.n, p.c, p.groups, scale, shift);
  for_each_element(p.layout, p.n, p.c, p.s, [&](int64_t sample, int64_t ch, int64_t e) {
    F y = activate<A>(to_math(x[e]) * scale[sample * p.c + ch] + shift[sample * p.c + ch]);
    if (residual) y += to_math(residual[e]);
    out[e] = from_math<T>(y);
  });
  return Status::Ok();
}

template <typename T, Activation A>
Status backward_typed(const GroupNormBackwardParams& p) {
  using F = math_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_out);
  T* dx = static_cast<T*>(p.grad_x);
  const int64_t per_group = p.c / p.groups;
  const double inv_m = 1.0 / static_cast<double>(per_group * p.s);

  std::vector<F> scale, shift;
  affine_per_channel(p.mean, p.rstd, p.weight, p.bias, p.n, p.c, p.groups, scale, shift);
  auto x_hat = [&](int64_t sample, int64_t ch, F v) {
    const int64_t g = sample * p.groups + ch / per_group;
    return (v - F(p.mean[g])) * F(p.rstd[g]);
  };
  auto dz_of = [&](int64_t sample, int64_t ch, int64_t e) {
    const F z = to_math(x[e]) * scale[sample * p.c + ch] + shift[sample * p.c + ch];
    return to_math(dy[e]) * activate_grad<A>(z);
  };

  std::vector<double> p1, p2;
  reduce_per_channel<T>(p.layout, p.n, p.c, p.s, p1, p2, [&](int64_t sample, int64_t ch, int64_t e) {
    const F dz = dz_of(sample, ch, e);
    return std::pair<double, double>{dz, static_cast<double>(dz) * x_hat(sample, ch, to_math(x[e]))};
  });

  const F* weight = static_cast<const F*>(p.weight);
  if (p.grad_weight || p.grad_bias) {
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
  std::vector<F> a_over_m(p.n * p.groups), b_over_m(p.n * p.groups);
  for (int64_t sample = 0; sample < p.n; ++sample)
    for (int64_t g = 0; g < p.groups; ++g) {
      double a = 0.0, b = 0.0;
      for (int64_t ch = g * per_group; ch < (g + 1) * per_group; ++ch) {
        const double w = weight ? weight[ch] : 1.0;
        a += w * p1[sample * p.c + ch];
        b += w * p2[sample * p.c + ch];
      }
      a_over_m[sample * p.groups + g] = static_cast<F>(a * inv_m);
      b_over_m[sample * p.groups + g] = static_cast<F>(b * inv_m);
    }
  for_each_element(p.layout, p.n, p.c, p.s, [&](int64_t sample, int64_t ch, int64_t e) {
    const int64_t g = sample * p.groups + ch / per_group;
    const F w = weight ? weight[ch] : F(1);
    const F v = to_math(x[e]);
    dx[e] = from_math<T>(F(p.rstd[g]) * (dz_of(sample, ch, e) * w - a_over_m[g] - x_hat(sample, ch, v) * b_over_m[g]));
  });
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
  if (p.n == 0) return Status::Ok();
  return FL_DTYPE_SWITCH_WITH_DOUBLE(p.dtype, scalar_t, Status::Error("group_norm: unsupported dtype"), [&] {
    return FL_ACTIVATION_SWITCH(p.activation, kAct, [&] { return forward_typed<scalar_t, kAct>(p); });
  });
}

Status run_group_norm_backward_cpu(const GroupNormBackwardParams& p) {
  const Status sizes = check_sizes(p.n, p.c, p.s, p.groups);
  if (!sizes.ok) return sizes;
  if (p.n == 0) {
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
