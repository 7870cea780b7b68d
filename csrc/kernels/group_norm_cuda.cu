// CUDA group_norm forward and backward (see group_norm.h).
//
// Forward:
//   1. channel_stats: grid (n * splits, channel tiles). A block reduces one chunk of
//      positions of one sample for its channels: each thread keeps a Welford (mean, M2)
//      state, states merge by Chan's formula through shared memory; the block writes one
//      (mean, M2) partial per channel. Splitting the positions over many blocks is what
//      keeps the GPU busy at batch 1 (eager GroupNorm launches n * groups blocks).
//   2. group_stats: one warp per (n, g) merges its channels' partials in a fixed order (lanes,
//      then a fixed tree) in double -> mean, rstd; then one thread per (n, c): scale, shift.
//   3. apply: out = act(x * scale + shift) (+ residual), 16-byte vectors where the layout
//      allows (channels-first: s % vec == 0; channels-last: c % vec == 0).
// Backward: channel_grad_sums (same grid, fp32 partials of dz and dz * x_hat), merge in double
// per channel and per group, then the elementwise grad_x pass.
// group_norm_stats is step 1 and the merge of step 2 (writing M2 instead of rstd);
// group_norm_apply is the rest of step 2 and step 3.
// Partials are merged in a fixed order, so results are deterministic.
#include <cmath>

#include "cuda_utils.cuh"
#include "group_norm.h"

namespace fastlatent {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 4096;         // positions per block (channels-first)
constexpr int kChunkLast = 512;      // positions per block (channels-last)
constexpr int kChannelTile = 32;     // channels per block (channels-last)
constexpr int kRowsPerPass = kThreads / kChannelTile;

int64_t chunk_of(Layout layout) { return layout == Layout::kChannelsFirst ? kChunk : kChunkLast; }
int64_t splits_of(int64_t s, Layout layout) {
  const int64_t chunk = chunk_of(layout);
  return s == 0 ? 1 : (s + chunk - 1) / chunk;
}

struct Welford {
  float mean = 0.0f, m2 = 0.0f, count = 0.0f;
  __device__ void add(float v) {
    count += 1.0f;
    const float delta = v - mean;
    mean += delta / count;
    m2 += delta * (v - mean);
  }
  __device__ void merge(const Welford& o) {
    if (o.count == 0.0f) return;
    if (count == 0.0f) {
      *this = o;
      return;
    }
    const float total = count + o.count;
    const float delta = o.mean - mean;
    mean += delta * (o.count / total);
    m2 += o.m2 + delta * delta * (count * o.count / total);
    count = total;
  }
};

using cuda::to_float;

// Partials layout: [n][split][c] of float2 (a, b). Forward: (mean, M2); backward: (sum dz,
// sum dz * x_hat).

// Channels-first reduction: block (plane, split) over positions [split * chunk, ...).
template <typename T, bool Backward, Activation A>
__global__ void __launch_bounds__(kThreads)
reduce_cf_kernel(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ scale,
                 const float* __restrict__ shift, const float* __restrict__ mean, const float* __restrict__ rstd,
                 int64_t c, int64_t s, int64_t groups, int64_t splits, float2* __restrict__ partials) {
  __shared__ Welford states[kThreads];
  __shared__ float2 sums[kThreads];
  const int64_t plane = blockIdx.x / splits, split = blockIdx.x % splits;
  const int64_t sample = plane / c, ch = plane % c;
  const int64_t p0 = split * kChunk, p1 = min(s, p0 + kChunk);
  const T* xp = x + plane * s;
  Welford w;
  float a = 0.0f, b = 0.0f;
  if constexpr (Backward) {
    const T* dyp = dy + plane * s;
    const float sc = scale[plane], sh = shift[plane];
    const int64_t g = sample * groups + ch / (c / groups);
    const float mu = mean[g], r = rstd[g];
    for (int64_t p = p0 + threadIdx.x; p < p1; p += kThreads) {
      const float v = to_float(xp[p]);
      const float dz = to_float(dyp[p]) * activate_grad<A>((v - mu) * sc + sh);
      a += dz;
      b += dz * (v - mu) * r;
    }
    sums[threadIdx.x] = make_float2(a, b);
  } else {
    for (int64_t p = p0 + threadIdx.x; p < p1; p += kThreads) w.add(to_float(xp[p]));
    states[threadIdx.x] = w;
  }
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      if constexpr (Backward) {
        sums[threadIdx.x].x += sums[threadIdx.x + stride].x;
        sums[threadIdx.x].y += sums[threadIdx.x + stride].y;
      } else {
        states[threadIdx.x].merge(states[threadIdx.x + stride]);
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partials[(sample * splits + split) * c + ch] =
        Backward ? sums[0] : make_float2(states[0].mean, states[0].m2);
  }
}

// Channels-last reduction: block (sample, split) x channel tile; threads: kChannelTile
// channels (coalesced) x kRowsPerPass positions.
template <typename T, bool Backward, Activation A>
__global__ void __launch_bounds__(kThreads)
reduce_cl_kernel(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ scale,
                 const float* __restrict__ shift, const float* __restrict__ mean, const float* __restrict__ rstd,
                 int64_t c, int64_t s, int64_t groups, int64_t splits, float2* __restrict__ partials) {
  __shared__ Welford states[kRowsPerPass][kChannelTile];
  __shared__ float2 sums[kRowsPerPass][kChannelTile];
  const int64_t sample = blockIdx.x / splits, split = blockIdx.x % splits;
  const int lane_c = threadIdx.x % kChannelTile, lane_p = threadIdx.x / kChannelTile;
  const int64_t ch = static_cast<int64_t>(blockIdx.y) * kChannelTile + lane_c;
  const int64_t p0 = split * kChunkLast, p1 = min(s, p0 + kChunkLast);
  Welford w;
  float a = 0.0f, b = 0.0f;
  if (ch < c) {
    if constexpr (Backward) {
      const float sc = scale[sample * c + ch], sh = shift[sample * c + ch];
      const int64_t g = sample * groups + ch / (c / groups);
      const float mu = mean[g], r = rstd[g];
      for (int64_t p = p0 + lane_p; p < p1; p += kRowsPerPass) {
        const int64_t e = (sample * s + p) * c + ch;
        const float v = to_float(x[e]);
        const float dz = to_float(dy[e]) * activate_grad<A>((v - mu) * sc + sh);
        a += dz;
        b += dz * (v - mu) * r;
      }
    } else {
      for (int64_t p = p0 + lane_p; p < p1; p += kRowsPerPass) w.add(to_float(x[(sample * s + p) * c + ch]));
    }
  }
  if constexpr (Backward) {
    sums[lane_p][lane_c] = make_float2(a, b);
  } else {
    states[lane_p][lane_c] = w;
  }
  __syncthreads();
  if (lane_p == 0 && ch < c) {
    for (int r = 1; r < kRowsPerPass; ++r) {
      if constexpr (Backward) {
        a += sums[r][lane_c].x;
        b += sums[r][lane_c].y;
      } else {
        w.merge(states[r][lane_c]);
      }
    }
    partials[(sample * splits + split) * c + ch] = Backward ? make_float2(a, b) : make_float2(w.mean, w.m2);
  }
}

// Chan's merge of a (count, mean, M2) state into another, in double.
struct GroupState {
  double count = 0.0, mean = 0.0, m2 = 0.0;
  __device__ void merge(double cnt, double part_mean, double part_m2) {
    if (cnt <= 0.0) return;
    const double total = count + cnt, delta = part_mean - mean;
    mean += delta * (cnt / total);
    m2 += part_m2 + delta * delta * (count * cnt / total);
    count = total;
  }
};

// One warp per (n, g): lane l merges the group's partials l, l + 32, ... (channel-major, then
// split) in order, then the 32 lane states merge by a fixed xor tree, the lower lane's state
// first. The order of every merge is fixed, so the result is deterministic. Writes rstd (the
// forward) or M2 (group_norm_stats), whichever pointer is given.
__global__ void group_stats_kernel(const float2* __restrict__ partials, int64_t n, int64_t c, int64_t s,
                                   int64_t groups, int64_t splits, int64_t chunk, float eps,
                                   float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                   float* __restrict__ m2_out) {
  const int lane = threadIdx.x & 31;
  const int64_t per_group = c / groups;
  const int64_t first = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int64_t stride = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t ng = first; ng < n * groups; ng += stride) {  // ng is uniform across the warp
    const int64_t sample = ng / groups, g = ng % groups;
    GroupState state;
    for (int64_t item = lane; item < per_group * splits; item += 32) {
      const int64_t ch = g * per_group + item / splits, split = item % splits;
      const double cnt = static_cast<double>(min(s, (split + 1) * chunk) - split * chunk);
      const float2 part = partials[(sample * splits + split) * c + ch];
      state.merge(cnt, part.x, part.y);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      GroupState other;
      other.count = __shfl_xor_sync(0xffffffffu, state.count, offset);
      other.mean = __shfl_xor_sync(0xffffffffu, state.mean, offset);
      other.m2 = __shfl_xor_sync(0xffffffffu, state.m2, offset);
      if (lane & offset) {  // the lower lane's state first, so both lanes hold the same bits
        other.merge(state.count, state.mean, state.m2);
        state = other;
      } else {
        state.merge(other.count, other.mean, other.m2);
      }
    }
    if (lane == 0) {
      mean_out[ng] = static_cast<float>(state.mean);
      if (rstd_out) rstd_out[ng] = static_cast<float>(1.0 / sqrt(fmax(state.m2 / state.count, 0.0) + eps));
      if (m2_out) m2_out[ng] = static_cast<float>(fmax(state.m2, 0.0));
    }
  }
}

// One thread per (n, c): scale = rstd * w, shift = b; applied as (x - mean) * scale + shift,
// which stays exact when |mean| >> std (x * scale + (b - mean * scale) cancels there).
__global__ void affine_kernel(const float* __restrict__ mean, const float* __restrict__ rstd,
                              const float* __restrict__ weight, const float* __restrict__ bias, int64_t n, int64_t c,
                              int64_t groups, float* __restrict__ scale, float* __restrict__ shift) {
  const int64_t nc = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (nc >= n * c) return;
  const int64_t ch = nc % c, g = (nc / c) * groups + ch / (c / groups);
  const float w = weight ? weight[ch] : 1.0f, b = bias ? bias[ch] : 0.0f;
  scale[nc] = rstd[g] * w;
  shift[nc] = b;
}

// Backward merges: per channel grad_weight/grad_bias over (n, splits); per group A/m, B/m.
__global__ void grad_merge_kernel(const float2* __restrict__ partials, const float* __restrict__ weight, int64_t n,
                                  int64_t c, int64_t s, int64_t groups, int64_t splits, float* __restrict__ grad_weight,
                                  float* __restrict__ grad_bias, float* __restrict__ a_over_m,
                                  float* __restrict__ b_over_m) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t per_group = c / groups;
  if (t < c && (grad_weight || grad_bias)) {
    double gw = 0.0, gb = 0.0;
    for (int64_t sample = 0; sample < n; ++sample)
      for (int64_t split = 0; split < splits; ++split) {
        const float2 part = partials[(sample * splits + split) * c + t];
        gb += part.x;
        gw += part.y;
      }
    if (grad_weight) grad_weight[t] = static_cast<float>(gw);
    if (grad_bias) grad_bias[t] = static_cast<float>(gb);
  }
  if (t < n * groups) {
    const int64_t sample = t / groups, g = t % groups;
    double a = 0.0, b = 0.0;
    for (int64_t ch = g * per_group; ch < (g + 1) * per_group; ++ch) {
      const double w = weight ? weight[ch] : 1.0;
      for (int64_t split = 0; split < splits; ++split) {
        const float2 part = partials[(sample * splits + split) * c + ch];
        a += w * part.x;
        b += w * part.y;
      }
    }
    const double m = static_cast<double>(per_group) * s;
    a_over_m[t] = static_cast<float>(a / m);
    b_over_m[t] = static_cast<float>(b / m);
  }
}

template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
};

// Elementwise passes. Forward: out = act(x * scale + shift) (+ residual). Backward:
// dx = rstd * (dz * w - A/m - x_hat * B/m). kVec elements per step share a channel
// (channels-first, s % kVec == 0) or are kVec consecutive channels (channels-last,
// c % kVec == 0); Vectorized = false takes one element per step.
template <typename T, Activation A, bool Backward, bool Vectorized>
__global__ void __launch_bounds__(kThreads)
elementwise_kernel(const T* __restrict__ x, const T* __restrict__ other, T* __restrict__ out,
                   const float* __restrict__ scale, const float* __restrict__ shift,
                   const float* __restrict__ weight, const float* __restrict__ mean, const float* __restrict__ rstd,
                   const float* __restrict__ a_over_m, const float* __restrict__ b_over_m, int64_t n, int64_t c,
                   int64_t s, int64_t groups, Layout layout) {
  constexpr int kV = Vectorized ? Vec<T>::kSize : 1;
  const int64_t total = n * c * s / kV;
  const int64_t per_group = c / groups;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e0 = i * kV;
    T xv[kV], ov[kV], result[kV];
    if constexpr (Vectorized) {
      *reinterpret_cast<uint4*>(xv) = *reinterpret_cast<const uint4*>(x + e0);
      if (other) *reinterpret_cast<uint4*>(ov) = *reinterpret_cast<const uint4*>(other + e0);
    } else {
      xv[0] = x[e0];
      if (other) ov[0] = other[e0];
    }
    // Indices once per vector: its kV elements share one channel (channels-first: s % kV == 0)
    // or are kV consecutive channels of one position (channels-last: c % kV == 0, so they never
    // wrap into the next position); the group steps up where a channel crosses a group boundary.
    int64_t nc, ch, g, group_end;
    if (layout == Layout::kChannelsFirst) {
      nc = e0 / s;
      const int64_t sample = nc / c;
      ch = nc - sample * c;
      g = ch / per_group;
      group_end = (g + 1) * per_group;
      g += sample * groups;
    } else {
      const int64_t position = e0 / c;  // sample * s + spatial index
      const int64_t sample = position / s;
      ch = e0 - position * c;
      nc = sample * c + ch;
      g = ch / per_group;
      group_end = (g + 1) * per_group;
      g += sample * groups;
    }
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      if (layout == Layout::kChannelsLast && j > 0) {
        ++ch;
        ++nc;
        if (ch == group_end) {
          ++g;
          group_end += per_group;
        }
      }
      const float v = to_float(xv[j]) - mean[g];
      const float z = v * scale[nc] + shift[nc];
      float y;
      if constexpr (Backward) {
        const float dz = to_float(ov[j]) * activate_grad<A>(z);
        const float w = weight ? weight[ch] : 1.0f;
        y = rstd[g] * (dz * w - a_over_m[g] - v * rstd[g] * b_over_m[g]);
      } else {
        y = activate<A>(z);
        if (other) y += to_float(ov[j]);
      }
      result[j] = cuda::from_float<T>(y);
    }
    if constexpr (Vectorized) {
      *reinterpret_cast<uint4*>(out + e0) = *reinterpret_cast<const uint4*>(result);
    } else {
      out[e0] = result[0];
    }
  }
}

unsigned int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > 65535 * 16 ? 65535 * 16 : blocks));
}

bool can_vectorize(Layout layout, int64_t c, int64_t s, int vec, const void* a, const void* b, const void* d) {
  const bool shape_ok = layout == Layout::kChannelsFirst ? s % vec == 0 : c % vec == 0;
  auto aligned = [](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return shape_ok && aligned(a) && aligned(b) && aligned(d);
}

template <typename T, Activation A, bool Backward>
cudaError_t launch_elementwise(const T* x, const T* other, T* out, const float* scale, const float* shift,
                               const float* weight, const float* mean, const float* rstd, const float* a_over_m,
                               const float* b_over_m, int64_t n, int64_t c, int64_t s, int64_t groups, Layout layout,
                               cudaStream_t stream) {
  constexpr int kV = Vec<T>::kSize;
  if (can_vectorize(layout, c, s, kV, x, other, out)) {
    elementwise_kernel<T, A, Backward, true><<<grid_for(n * c * s / kV), kThreads, 0, stream>>>(
        x, other, out, scale, shift, weight, mean, rstd, a_over_m, b_over_m, n, c, s, groups, layout);
  } else {
    elementwise_kernel<T, A, Backward, false><<<grid_for(n * c * s), kThreads, 0, stream>>>(
        x, other, out, scale, shift, weight, mean, rstd, a_over_m, b_over_m, n, c, s, groups, layout);
  }
  return cudaGetLastError();
}

template <typename T, bool Backward, Activation A>
cudaError_t launch_reduce(const T* x, const T* dy, const float* scale, const float* shift, const float* mean,
                          const float* rstd, int64_t n, int64_t c, int64_t s, int64_t groups, Layout layout,
                          float2* partials, cudaStream_t stream) {
  const int64_t splits = splits_of(s, layout);
  if (layout == Layout::kChannelsFirst) {
    reduce_cf_kernel<T, Backward, A><<<static_cast<unsigned int>(n * c * splits), kThreads, 0, stream>>>(
        x, dy, scale, shift, mean, rstd, c, s, groups, splits, partials);
  } else {
    const dim3 grid(static_cast<unsigned int>(n * splits), static_cast<unsigned int>((c + kChannelTile - 1) / kChannelTile));
    reduce_cl_kernel<T, Backward, A><<<grid, kThreads, 0, stream>>>(x, dy, scale, shift, mean, rstd, c, s, groups,
                                                                   splits, partials);
  }
  return cudaGetLastError();
}

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Workspace: partials [n][splits][c] float2, scale [n c], shift [n c], then (backward) A, B [n g].
struct Workspace {
  float2* partials;
  float* scale;
  float* shift;
  float* a_over_m;
  float* b_over_m;
};

Workspace carve(void* base, int64_t n, int64_t c, int64_t s, Layout layout) {
  char* p = static_cast<char*>(base);
  Workspace w;
  const int64_t splits = std::max(splits_of(s, Layout::kChannelsFirst), splits_of(s, Layout::kChannelsLast));
  (void)layout;
  w.partials = reinterpret_cast<float2*>(p);
  p += align_up(static_cast<size_t>(n) * splits * c * sizeof(float2));
  w.scale = reinterpret_cast<float*>(p);
  p += align_up(static_cast<size_t>(n) * c * sizeof(float));
  w.shift = reinterpret_cast<float*>(p);
  p += align_up(static_cast<size_t>(n) * c * sizeof(float));
  w.a_over_m = reinterpret_cast<float*>(p);
  p += align_up(static_cast<size_t>(n) * c * sizeof(float));  // n * groups <= n * c
  w.b_over_m = reinterpret_cast<float*>(p);
  return w;
}

template <typename T, Activation A>
cudaError_t forward_typed(const GroupNormParams& p, cudaStream_t stream) {
  const Workspace w = carve(p.workspace, p.n, p.c, p.s, p.layout);
  const T* x = static_cast<const T*>(p.x);
  cudaError_t err = launch_reduce<T, false, A>(x, nullptr, nullptr, nullptr, nullptr, nullptr, p.n, p.c, p.s,
                                               p.groups, p.layout, w.partials, stream);
  if (err != cudaSuccess) return err;
  group_stats_kernel<<<grid_for(p.n * p.groups * 32), kThreads, 0, stream>>>(
      w.partials, p.n, p.c, p.s, p.groups, splits_of(p.s, p.layout), chunk_of(p.layout), p.eps, p.mean, p.rstd,
      nullptr);
  affine_kernel<<<grid_for(p.n * p.c), kThreads, 0, stream>>>(p.mean, p.rstd, static_cast<const float*>(p.weight),
                                                             static_cast<const float*>(p.bias), p.n, p.c, p.groups,
                                                             w.scale, w.shift);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_elementwise<T, A, false>(x, static_cast<const T*>(p.residual), static_cast<T*>(p.out), w.scale,
                                         w.shift, nullptr, p.mean, nullptr, nullptr, nullptr, p.n, p.c, p.s,
                                         p.groups, p.layout, stream);
}

template <typename T>
cudaError_t stats_typed(const GroupNormStatsParams& p, cudaStream_t stream) {
  const Workspace w = carve(p.workspace, p.n, p.c, p.s, p.layout);
  cudaError_t err = launch_reduce<T, false, Activation::kNone>(static_cast<const T*>(p.x), nullptr, nullptr, nullptr,
                                                               nullptr, nullptr, p.n, p.c, p.s, p.groups, p.layout,
                                                               w.partials, stream);
  if (err != cudaSuccess) return err;
  group_stats_kernel<<<grid_for(p.n * p.groups * 32), kThreads, 0, stream>>>(
      w.partials, p.n, p.c, p.s, p.groups, splits_of(p.s, p.layout), chunk_of(p.layout), 0.0f, p.mean, nullptr,
      p.m2);
  return cudaGetLastError();
}

template <typename T, Activation A>
cudaError_t apply_typed(const GroupNormApplyParams& p, cudaStream_t stream) {
  const Workspace w = carve(p.workspace, p.n, p.c, p.s, p.layout);
  affine_kernel<<<grid_for(p.n * p.c), kThreads, 0, stream>>>(p.mean, p.rstd, static_cast<const float*>(p.weight),
                                                             static_cast<const float*>(p.bias), p.n, p.c, p.groups,
                                                             w.scale, w.shift);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_elementwise<T, A, false>(static_cast<const T*>(p.x), nullptr, static_cast<T*>(p.out), w.scale,
                                         w.shift, nullptr, p.mean, nullptr, nullptr, nullptr, p.n, p.c, p.s,
                                         p.groups, p.layout, stream);
}

template <typename T, Activation A>
cudaError_t backward_typed(const GroupNormBackwardParams& p, cudaStream_t stream) {
  const Workspace w = carve(p.workspace, p.n, p.c, p.s, p.layout);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_out);
  const float* weight = static_cast<const float*>(p.weight);
  affine_kernel<<<grid_for(p.n * p.c), kThreads, 0, stream>>>(p.mean, p.rstd, weight, static_cast<const float*>(p.bias),
                                                             p.n, p.c, p.groups, w.scale, w.shift);
  cudaError_t err = launch_reduce<T, true, A>(x, dy, w.scale, w.shift, p.mean, p.rstd, p.n, p.c, p.s, p.groups,
                                              p.layout, w.partials, stream);
  if (err != cudaSuccess) return err;
  grad_merge_kernel<<<grid_for(std::max(p.c, p.n * p.groups)), kThreads, 0, stream>>>(
      w.partials, weight, p.n, p.c, p.s, p.groups, splits_of(p.s, p.layout), p.grad_weight, p.grad_bias,
      w.a_over_m, w.b_over_m);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_elementwise<T, A, true>(x, dy, static_cast<T*>(p.grad_x), w.scale, w.shift, weight, p.mean, p.rstd,
                                        w.a_over_m, w.b_over_m, p.n, p.c, p.s, p.groups, p.layout, stream);
}

bool sizes_ok(int64_t n, int64_t c, int64_t s, int64_t groups) {
  return n >= 0 && c >= 1 && s >= 0 && groups >= 1 && c % groups == 0;
}

}  // namespace

size_t group_norm_cuda_workspace_bytes(int64_t n, int64_t c, int64_t s) {
  const int64_t splits = std::max(splits_of(s, Layout::kChannelsFirst), splits_of(s, Layout::kChannelsLast));
  return align_up(static_cast<size_t>(n) * splits * c * sizeof(float2)) +
         4 * align_up(static_cast<size_t>(n) * c * sizeof(float)) + 256;
}

size_t group_norm_backward_cuda_workspace_bytes(int64_t n, int64_t c, int64_t s) {
  return group_norm_cuda_workspace_bytes(n, c, s);
}

cudaError_t launch_group_norm_cuda(const GroupNormParams& p, cudaStream_t stream) {
  if (!sizes_ok(p.n, p.c, p.s, p.groups) || p.workspace == nullptr) return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    return FL_ACTIVATION_SWITCH(p.activation, kAct, [&] { return forward_typed<scalar_t, kAct>(p, stream); });
  });
}

cudaError_t launch_group_norm_backward_cuda(const GroupNormBackwardParams& p, cudaStream_t stream) {
  if (!sizes_ok(p.n, p.c, p.s, p.groups) || p.workspace == nullptr) return cudaErrorInvalidValue;
  if (p.n == 0) {
    cudaError_t err = cudaSuccess;
    if (p.grad_weight) err = cudaMemsetAsync(p.grad_weight, 0, p.c * sizeof(float), stream);
    if (err == cudaSuccess && p.grad_bias) err = cudaMemsetAsync(p.grad_bias, 0, p.c * sizeof(float), stream);
    return err;
  }
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    return FL_ACTIVATION_SWITCH(p.activation, kAct, [&] { return backward_typed<scalar_t, kAct>(p, stream); });
  });
}

cudaError_t launch_group_norm_stats_cuda(const GroupNormStatsParams& p, cudaStream_t stream) {
  if (!sizes_ok(p.n, p.c, p.s, p.groups) || p.workspace == nullptr) return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  if (p.s == 0) {  // an empty part: mean 0, M2 0
    cudaError_t err = cudaMemsetAsync(p.mean, 0, p.n * p.groups * sizeof(float), stream);
    return err == cudaSuccess ? cudaMemsetAsync(p.m2, 0, p.n * p.groups * sizeof(float), stream) : err;
  }
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue,
                              [&] { return stats_typed<scalar_t>(p, stream); });
}

cudaError_t launch_group_norm_apply_cuda(const GroupNormApplyParams& p, cudaStream_t stream) {
  if (!sizes_ok(p.n, p.c, p.s, p.groups) || p.workspace == nullptr) return cudaErrorInvalidValue;
  if (p.n == 0 || p.s == 0) return cudaSuccess;
  return FL_CUDA_DTYPE_SWITCH(p.dtype, scalar_t, cudaErrorInvalidValue, [&] {
    return FL_ACTIVATION_SWITCH(p.activation, kAct, [&] { return apply_typed<scalar_t, kAct>(p, stream); });
  });
}


}  // namespace fastlatent
