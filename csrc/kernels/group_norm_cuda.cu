// CUDA group_norm forward and backward (see group_norm.h).
//
// Forward:
//   1. channel_stats: grid (n * splits, channel tiles). A block reduces one chunk of
//      positions of one sample for its channels: each thread reads 16-byte vectors where the
//      layout allows (channels-first: s % vec == 0; channels-last: c % vec == 0, a lane taking
//      vec consecutive channels), sums deviations from its first value and their squares (no
//      division per element; see ShiftedSums) and turns them into one Welford (mean, M2) state;
//      states merge by Chan's formula (shuffles, then shared memory) in a fixed order; the block
//      writes one (mean, M2) partial per channel. Splitting the positions over many blocks is
//      what keeps the GPU busy at batch 1 (eager GroupNorm launches n * groups blocks).
//   2. group_stats: one warp per (n, g) merges its channels' partials in a fixed order (lanes,
//      then a fixed tree) in double -> mean, rstd; then one thread per (n, c): scale, shift.
//   3. apply: out = act((x - mean) * scale + shift) (+ residual). affine_kernel expands the
//      per-group mean and the affine into per-(n, c) arrays, so the pass needs no group index;
//      16-byte vectors where the layout allows (channels-first: s % vec == 0; channels-last:
//      c % vec == 0) run apply_kernel: 32-bit vector indices (the launcher splits the tensor
//      into launches of < 2^31 elements at row or sample boundaries; 64-bit pointer offsets
//      stay on the host) and one multiply-high division per vector by host-computed magic
//      numbers (channels-first: the row; channels-last: position and sample).
// Backward: channel_grad_sums (same grid, fp32 partials of dz and dz * x_hat), merge in double
// per channel and per group, then the elementwise grad_x pass: backward_coefficients_kernel folds
// mean, rstd, weight, A/m and B/m per (n, c) and backward_apply_kernel walks the vectors as
// apply_kernel does (walk_vectors, for_each_vector_launch), one element per step where the layout
// cannot vectorise.
// group_norm_stats is step 1 and the merge of step 2 (writing M2 instead of rstd);
// group_norm_apply is the rest of step 2 and step 3.
// Partials are merged in a fixed order, so results are deterministic.
#include <cmath>
#include <cstdlib>

#include "cuda_utils.cuh"
#include "fast_divmod.cuh"
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

using cuda::FastDivmod;
using cuda::to_float;

template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
};

// The kV elements of a 16-byte vector as floats. bf16 -> fp32 is exact bit placement: the low
// element of each 32-bit word shifted up, the high one masked (one instruction each; the generic
// conversion spends two on the high element).
template <typename T>
__device__ __forceinline__ void unpack(const uint4& v, float* f) {
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int j = 0; j < Vec<T>::kSize; ++j) f[j] = to_float(e[j]);
}
template <>
__device__ __forceinline__ void unpack<__nv_bfloat16>(const uint4& v, float* f) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = __uint_as_float(words[j] << 16);
    f[2 * j + 1] = __uint_as_float(words[j] & 0xffff0000u);
  }
}

// Per-thread forward statistics without a division per element: sums of v - shift and (v - shift)^2, the
// shift being the first value this thread sees of its channel (one add and one FMA per element). Turned
// into a Welford state once, at the end: mean = shift + sum / n, M2 = sq - sum^2 / n. The deviations from
// the shift are of the data's spread, not its mean, so |mean| >> std loses nothing to cancellation (sq and
// sum^2 / n differ by the spread's size), and a thread sees at most kChunk / kThreads (channels-first) or
// kChunkLast / kRowsPerPass (channels-last) values of a channel, which bounds the rounding of the sums.
struct ShiftedSums {
  float shift = 0.0f, sum = 0.0f, sq = 0.0f;
  __device__ __forceinline__ void add(float v) {
    const float d = v - shift;
    sum += d;
    sq = fmaf(d, d, sq);
  }
  __device__ __forceinline__ Welford welford(float count) const {
    Welford w;
    if (count > 0.0f) {
      const float mean_shift = sum / count;
      w.count = count;
      w.mean = shift + mean_shift;
      w.m2 = fmaxf(sq - sum * mean_shift, 0.0f);
    }
    return w;
  }
};

// kV consecutive elements starting at element e as floats: one 16-byte load when kV fills 16 bytes (e is
// then a multiple of kV and the tensor 16-byte aligned), else one element.
template <typename T, int kV>
__device__ __forceinline__ void load_run(const T* __restrict__ x, int64_t e, float* f) {
  if constexpr (kV == 1) {
    f[0] = to_float(x[e]);
  } else {
    unpack<T>(__ldg(reinterpret_cast<const uint4*>(x + e)), f);
  }
}

// Forward statistics of one channels-first block: positions [p0, p1) of one plane in runs of kV (p0, p1
// multiples of kV when kV > 1): the thread's state, merged by the block afterwards.
template <typename T, int kV>
__device__ __forceinline__ Welford plane_stats(const T* __restrict__ xp, int64_t p0, int64_t p1) {
  const int64_t first = p0 + static_cast<int64_t>(threadIdx.x) * kV;
  ShiftedSums acc;
  if (first < p1) acc.shift = to_float(xp[first]);
  float count = 0.0f;
  for (int64_t p = first; p < p1; p += static_cast<int64_t>(kThreads) * kV) {
    float f[kV];
    load_run<T, kV>(xp, p, f);
#pragma unroll
    for (int j = 0; j < kV; ++j) acc.add(f[j]);
    count += kV;
  }
  return acc.welford(count);
}

// Forward statistics of one channels-last block (positions [p0, p1) of one sample, channels
// [tile, tile + kChannelTile)): 32 / kV lanes of a warp cover the tile's channels, kV consecutive channels
// each (one 16-byte load per position when kV > 1; c is then a multiple of kV), and the warp's other lanes
// further positions. Each lane keeps kV states; the lanes of a channel group merge by a fixed shuffle tree
// and write states[warp][channel], which the block merges over warps as before.
template <typename T, int kV>
__device__ __forceinline__ void tile_stats(const T* __restrict__ x, int64_t c, int64_t s, int64_t sample,
                                           int64_t tile, int64_t p0, int64_t p1,
                                           Welford (&states)[kRowsPerPass][kChannelTile]) {
  constexpr int kLanesC = kChannelTile / kV, kRows = kThreads / kLanesC;
  const int lane = threadIdx.x & 31, lane_c = threadIdx.x % kLanesC, lane_p = threadIdx.x / kLanesC;
  const int64_t ch = tile + static_cast<int64_t>(lane_c) * kV;
  ShiftedSums acc[kV];
  // This lane's positions p0 + lane_p, + kRows, ... below p1: fewer than kChunkLast, so 32-bit counts.
  const int rows = ch < c && p0 + lane_p < p1 ? static_cast<int>((p1 - p0 - lane_p + kRows - 1) / kRows) : 0;
  if (rows > 0) {
    const T* xp = x + (sample * s + p0 + lane_p) * c + ch;
    const int64_t step = static_cast<int64_t>(kRows) * c;
    float f[kV];
    load_run<T, kV>(xp, 0, f);
#pragma unroll
    for (int j = 0; j < kV; ++j) acc[j].shift = f[j];
    // 4 loads in flight per lane; SASS per 16-byte vector (sm_90) bf16 / fp16 / fp32: 40.0 / 40.0 / 20.0
    // without unrolling, 39.5 / 36.5 / 17.5 by 2, 37.2 / 36.2 / 16.2 by 4.
#pragma unroll 4
    for (int r = 0; r < rows; ++r, xp += step) {
      load_run<T, kV>(xp, 0, f);
#pragma unroll
      for (int j = 0; j < kV; ++j) acc[j].add(f[j]);
    }
  }
  const float count = static_cast<float>(rows);
  Welford w[kV];
#pragma unroll
  for (int j = 0; j < kV; ++j) {
    w[j] = acc[j].welford(count);
#pragma unroll
    for (int offset = 16; offset >= kLanesC; offset >>= 1) {  // no shuffles when kV == 1
      Welford other;
      other.count = __shfl_down_sync(0xffffffffu, w[j].count, offset);
      other.mean = __shfl_down_sync(0xffffffffu, w[j].mean, offset);
      other.m2 = __shfl_down_sync(0xffffffffu, w[j].m2, offset);
      w[j].merge(other);
    }
  }
  if (lane < kLanesC) {
#pragma unroll
    for (int j = 0; j < kV; ++j) states[threadIdx.x / 32][lane_c * kV + j] = w[j];
  }
}

// Partials layout: [n][split][c] of float2 (a, b). Forward: (mean, M2); backward: (sum dz,
// sum dz * x_hat).

// Channels-first reduction: block (plane, split) over positions [split * chunk, ...). `vectorised` (the
// forward only): s is a multiple of Vec<T>::kSize and x 16-byte aligned, so every plane starts aligned.
template <typename T, bool Backward, Activation A>
__global__ void __launch_bounds__(kThreads)
reduce_cf_kernel(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ scale,
                 const float* __restrict__ shift, const float* __restrict__ mean, const float* __restrict__ rstd,
                 int64_t c, int64_t s, int64_t groups, int64_t splits, bool vectorised,
                 float2* __restrict__ partials) {
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
    w = vectorised ? plane_stats<T, Vec<T>::kSize>(xp, p0, p1) : plane_stats<T, 1>(xp, p0, p1);
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

// Channels-last reduction: block (sample, split) x channel tile. Backward: threads are kChannelTile
// channels (coalesced) x kRowsPerPass positions. Forward: tile_stats (kV channels per lane when
// `vectorised`: c a multiple of Vec<T>::kSize, x 16-byte aligned) leaves one state per (warp, channel).
template <typename T, bool Backward, Activation A>
__global__ void __launch_bounds__(kThreads)
reduce_cl_kernel(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ scale,
                 const float* __restrict__ shift, const float* __restrict__ mean, const float* __restrict__ rstd,
                 int64_t c, int64_t s, int64_t groups, int64_t splits, bool vectorised,
                 float2* __restrict__ partials) {
  __shared__ Welford states[kRowsPerPass][kChannelTile];
  __shared__ float2 sums[kRowsPerPass][kChannelTile];
  const int64_t sample = blockIdx.x / splits, split = blockIdx.x % splits;
  const int lane_c = threadIdx.x % kChannelTile, lane_p = threadIdx.x / kChannelTile;
  const int64_t ch = static_cast<int64_t>(blockIdx.y) * kChannelTile + lane_c;
  const int64_t p0 = split * kChunkLast, p1 = min(s, p0 + kChunkLast);
  Welford w;
  float a = 0.0f, b = 0.0f;
  if constexpr (Backward) {
    if (ch < c) {
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
    }
    sums[lane_p][lane_c] = make_float2(a, b);
  } else {
    const int64_t tile = static_cast<int64_t>(blockIdx.y) * kChannelTile;
    if (vectorised) {
      tile_stats<T, Vec<T>::kSize>(x, c, s, sample, tile, p0, p1, states);
    } else {
      tile_stats<T, 1>(x, c, s, sample, tile, p0, p1, states);
    }
  }
  __syncthreads();
  if (lane_p == 0 && ch < c) {
    if constexpr (!Backward) w = states[0][lane_c];
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

// One thread per (n, c): scale = rstd * w, shift = b and (when centre is given) the group's mean per
// channel, or all three as (mean, scale, shift, 0) in `packed` when that is given instead; applied as
// (x - mean) * scale + shift, which stays exact when |mean| >> std (x * scale + (b - mean * scale)
// cancels there).
__global__ void affine_kernel(const float* __restrict__ mean, const float* __restrict__ rstd,
                              const float* __restrict__ weight, const float* __restrict__ bias, int64_t n, int64_t c,
                              int64_t groups, float* __restrict__ scale, float* __restrict__ shift,
                              float* __restrict__ centre, float4* __restrict__ packed) {
  const int64_t nc = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (nc >= n * c) return;
  const int64_t ch = nc % c, g = (nc / c) * groups + ch / (c / groups);
  const float w = weight ? weight[ch] : 1.0f, b = bias ? bias[ch] : 0.0f;
  if (packed) {
    packed[nc] = make_float4(mean[g], rstd[g] * w, b, 0.0f);
    return;
  }
  scale[nc] = rstd[g] * w;
  shift[nc] = b;
  if (centre) centre[nc] = mean[g];
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

// The 64-bit scalar elementwise passes, for what the 32-bit vector walks below cannot take (the forward:
// layouts or alignments that do not vectorise; both: one row or sample of 2^31 elements or more).
// Forward: out = act((x - mean) * scale + shift) (+ residual). Backward:
// dx = rstd * (dz * w - A/m - x_hat * B/m). Indices are recomputed per element.
template <typename T, Activation A, bool Backward>
__global__ void __launch_bounds__(kThreads)
elementwise_kernel(const T* __restrict__ x, const T* __restrict__ other, T* __restrict__ out,
                   const float* __restrict__ scale, const float* __restrict__ shift,
                   const float* __restrict__ weight, const float* __restrict__ mean, const float* __restrict__ rstd,
                   const float* __restrict__ a_over_m, const float* __restrict__ b_over_m, int64_t n, int64_t c,
                   int64_t s, int64_t groups, Layout layout) {
  const int64_t total = n * c * s;
  const int64_t per_group = c / groups;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float xe = to_float(x[e]), oe = other ? to_float(other[e]) : 0.0f;
    int64_t nc, ch, sample;
    if (layout == Layout::kChannelsFirst) {
      nc = e / s;
      sample = nc / c;
      ch = nc - sample * c;
    } else {
      const int64_t position = e / c;  // sample * s + spatial index
      sample = position / s;
      ch = e - position * c;
      nc = sample * c + ch;
    }
    const int64_t g = sample * groups + ch / per_group;
    const float v = xe - mean[g];
    const float z = v * scale[nc] + shift[nc];
    float y;
    if constexpr (Backward) {
      const float dz = oe * activate_grad<A>(z);
      const float w = weight ? weight[ch] : 1.0f;
      y = rstd[g] * (dz * w - a_over_m[g] - v * rstd[g] * b_over_m[g]);
    } else {
      y = activate<A>(z);
      if (other) y += oe;
    }
    out[e] = cuda::from_float<T>(y);
  }
}

// kV consecutive floats of a coefficient array (16-byte loads when kV is a multiple of 4; the caller
// keeps p 16-byte aligned then).
template <int kV>
__device__ __forceinline__ void load_floats(const float* __restrict__ p, float* f) {
  if constexpr (kV % 4 == 0) {
#pragma unroll
    for (int j = 0; j < kV; j += 4) {
      *reinterpret_cast<float4*>(f + j) = __ldg(reinterpret_cast<const float4*>(p + j));
    }
  } else {
#pragma unroll
    for (int j = 0; j < kV; ++j) f[j] = __ldg(p + j);
  }
}

// Element vector i (kV elements) of t as floats, and its store: one 16-byte access when kV fills 16 bytes,
// else one element (kV == 1).
template <typename T, int kV>
__device__ __forceinline__ void load_elements(const T* __restrict__ t, uint32_t i, float* f) {
  if constexpr (kV == 1) {
    f[0] = to_float(t[i]);
  } else {
    unpack<T>(__ldg(reinterpret_cast<const uint4*>(t) + i), f);
  }
}
template <typename T, int kV>
__device__ __forceinline__ void store_elements(T* __restrict__ t, uint32_t i, const float* f) {
  T result[kV];
#pragma unroll
  for (int j = 0; j < kV; ++j) result[j] = cuda::from_float<T>(f[j]);
  if constexpr (kV == 1) {
    t[i] = result[0];
  } else {
    reinterpret_cast<uint4*>(t)[i] = *reinterpret_cast<const uint4*>(result);
  }
}

// The walk over element vectors shared by the forward and backward apply passes. Block b owns the
// contiguous vectors [b * kThreads * per_thread, ...); thread t takes every kThreads-th of them
// (coalesced), so its successive vectors usually share their coefficients, which stay in registers until
// the vector index passes the segment's end:
//   channels-first (s % kV == 0): a vector lies in one row nc = i / (s / kV), whose coefficients hold to
//     the row's end.
//   channels-last (c % kV == 0): a vector is kV consecutive channels nc0 .. nc0 + kV - 1 of one position
//     (never crossing into the next; nc0 % kV == 0). When c / kV divides kThreads a thread's channels
//     never change, so they hold to the sample's end; otherwise every vector reloads.
// load(nc) loads the coefficients of the vector's first (n, c) index; body(i) streams vector i. The
// reload divides by host-computed magic numbers (FastDivmod: per_row is the vectors per row or per
// position, per_sample the positions per sample). All indices are 32-bit: the launcher keeps each launch
// below 2^31 elements.
template <Layout L, int kV, typename Load, typename Body>
__device__ __forceinline__ void walk_vectors(uint32_t vectors, uint32_t per_thread, FastDivmod per_row,
                                             FastDivmod per_sample, uint32_t c, Load&& load, Body&& body) {
  const uint32_t block_first = blockIdx.x * kThreads * per_thread;
  const uint32_t limit = min(vectors, block_first + kThreads * per_thread);
  const bool fixed_channels = L == Layout::kChannelsFirst || kThreads % per_row.divisor == 0;
  uint32_t i = block_first + threadIdx.x;
  while (i < limit) {
    uint32_t segment_end;
    if constexpr (L == Layout::kChannelsFirst) {
      const uint32_t row = per_row.div(i);
      segment_end = (row + 1) * per_row.divisor;
      load(row);
    } else {
      const uint32_t position = per_row.div(i);
      const uint32_t sample = per_sample.div(position);
      segment_end = fixed_channels ? (sample + 1) * per_sample.divisor * per_row.divisor : i + 1;
      load(sample * c + (i - position * per_row.divisor) * kV);
    }
    segment_end = min(segment_end, limit);
    for (; i < segment_end; i += kThreads) body(i);  // the streaming loop: no index math
  }
}

// The vectorised forward apply pass: 16-byte vectors of kV elements walked by walk_vectors. Coefficients:
// channels-first, one 16-byte load of `packed` (mean, scale, shift, 0) per row; channels-last, kV
// consecutive floats of each of centre, scale and shift.
template <typename T, Activation A, Layout L, bool Residual>
__global__ void __launch_bounds__(kThreads)
apply_kernel(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ out,
             const float4* __restrict__ packed, const float* __restrict__ centre,
             const float* __restrict__ scale, const float* __restrict__ shift, uint32_t vectors,
             uint32_t per_thread, FastDivmod per_row, FastDivmod per_sample, uint32_t c) {
  constexpr int kV = Vec<T>::kSize;
  float mu[kV], sc[kV], sh[kV];
  walk_vectors<L, kV>(
      vectors, per_thread, per_row, per_sample, c,
      [&](uint32_t nc) {
        if constexpr (L == Layout::kChannelsFirst) {
          const float4 k = __ldg(packed + nc);
#pragma unroll
          for (int j = 0; j < kV; ++j) mu[j] = k.x, sc[j] = k.y, sh[j] = k.z;
        } else {
          load_floats<kV>(centre + nc, mu);
          load_floats<kV>(scale + nc, sc);
          load_floats<kV>(shift + nc, sh);
        }
      },
      [&](uint32_t i) {
        float xv[kV], rv[kV];
        load_elements<T, kV>(x, i, xv);
        if constexpr (Residual) load_elements<T, kV>(residual, i, rv);
#pragma unroll
        for (int j = 0; j < kV; ++j) {
          xv[j] = activate<A>((xv[j] - mu[j]) * sc[j] + sh[j]);
          if constexpr (Residual) xv[j] += rv[j];
        }
        store_elements<T, kV>(out, i, xv);
      });
}

// Per-(n, c) coefficients of the backward's elementwise pass. With v = x - mean, z = v * scale + shift and
// dz = dy * act'(z):
//   dx = rstd * (dz * w - A/m - v * rstd * B/m) = dz * k_dz + (v * k_v + k_0),
//   k_dz = rstd * w, k_v = -rstd^2 * B/m, k_0 = -rstd * A/m (products in double, rounded once).
// Channels-first writes (mean, k_dz, k_v, k_0) per (n, c) to `packed`; channels-last writes the four
// as separate arrays (kV consecutive channels load as 16-byte vectors).
struct BackwardCoefficients {
  float4* packed;  // [n c], channels-first
  float* centre;   // [n c] each, channels-last
  float* k_dz;
  float* k_v;
  float* k_0;
};

__global__ void backward_coefficients_kernel(const float* __restrict__ mean, const float* __restrict__ rstd,
                                             const float* __restrict__ weight,
                                             const float* __restrict__ a_over_m,
                                             const float* __restrict__ b_over_m, int64_t n, int64_t c,
                                             int64_t groups, BackwardCoefficients out) {
  const int64_t nc = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (nc >= n * c) return;
  const int64_t ch = nc % c, g = (nc / c) * groups + ch / (c / groups);
  const double r = rstd[g], w = weight ? weight[ch] : 1.0;
  const float mu = mean[g], k_dz = static_cast<float>(r * w), k_v = static_cast<float>(-r * r * b_over_m[g]),
              k_0 = static_cast<float>(-r * a_over_m[g]);
  if (out.packed) {
    out.packed[nc] = make_float4(mu, k_dz, k_v, k_0);
    return;
  }
  out.centre[nc] = mu;
  out.k_dz[nc] = k_dz;
  out.k_v[nc] = k_v;
  out.k_0[nc] = k_0;
}

// The backward's elementwise pass dx = dz * k_dz + (v * k_v + k_0), walked by walk_vectors over vectors
// of kV elements (16 bytes, or kV = 1 for layouts and alignments that cannot vectorise). The activation's
// gradient needs z, so A != none also loads the forward's per-(n, c) scale and shift.
template <typename T, Activation A, Layout L, int kV>
__global__ void __launch_bounds__(kThreads)
backward_apply_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                      BackwardCoefficients k, const float* __restrict__ scale,
                      const float* __restrict__ shift,
                      uint32_t vectors, uint32_t per_thread, FastDivmod per_row, FastDivmod per_sample,
                      uint32_t c) {
  constexpr bool kAct = A != Activation::kNone;
  float mu[kV], kdz[kV], kv[kV], k0[kV], sc[kV], sh[kV];
  walk_vectors<L, kV>(
      vectors, per_thread, per_row, per_sample, c,
      [&](uint32_t nc) {
        if constexpr (L == Layout::kChannelsFirst) {
          const float4 q = __ldg(k.packed + nc);
          const float q_sc = kAct ? __ldg(scale + nc) : 0.0f, q_sh = kAct ? __ldg(shift + nc) : 0.0f;
#pragma unroll
          for (int j = 0; j < kV; ++j) {
            mu[j] = q.x, kdz[j] = q.y, kv[j] = q.z, k0[j] = q.w, sc[j] = q_sc, sh[j] = q_sh;
          }
        } else {
          load_floats<kV>(k.centre + nc, mu);
          load_floats<kV>(k.k_dz + nc, kdz);
          load_floats<kV>(k.k_v + nc, kv);
          load_floats<kV>(k.k_0 + nc, k0);
          if constexpr (kAct) {
            load_floats<kV>(scale + nc, sc);
            load_floats<kV>(shift + nc, sh);
          }
        }
      },
      [&](uint32_t i) {
        float xv[kV], dv[kV];
        load_elements<T, kV>(x, i, xv);
        load_elements<T, kV>(dy, i, dv);
#pragma unroll
        for (int j = 0; j < kV; ++j) {
          const float v = xv[j] - mu[j];
          const float dz = kAct ? dv[j] * activate_grad<A>(v * sc[j] + sh[j]) : dv[j];
          xv[j] = dz * kdz[j] + (v * kv[j] + k0[j]);
        }
        store_elements<T, kV>(dx, i, xv);
      });
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

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Workspace: partials [n][splits][c] float2, scale [n c], shift [n c], then (backward) A, B [n g] and the
// elementwise pass's coefficients (4 [n c] float arrays, or [n c] float4); the forward's per-channel mean
// [n c] takes A's place and it has no coefficient region.
struct Workspace {
  float2* partials;
  float* scale;
  float* shift;
  float* a_over_m;
  float* b_over_m;
  float* coefficients;  // backward only
  float* centre() const { return a_over_m; }
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
  p += align_up(static_cast<size_t>(n) * c * sizeof(float));
  w.coefficients = reinterpret_cast<float*>(p);
  return w;
}

constexpr int64_t kMaxLaunchElements = (int64_t{1} << 31) - 1;

// One launch of the vectorised passes: elements [e0, e0 + vectors * kV) of the tensor, whose first (n, c)
// index is nc0, over `blocks` blocks of kThreads threads taking per_thread vectors each.
struct VectorLaunch {
  int64_t e0, nc0;
  uint32_t vectors, per_thread;
  unsigned int blocks;
};

// Splits the tensor into launches of < 2^31 elements cut at row (channels-first) or sample (channels-last)
// boundaries, so the kernels' 32-bit indices never wrap (each launch's pointer offsets stay 64-bit here),
// and calls launch(VectorLaunch, per_row, per_sample) for each; kV elements per vector. The caller has
// checked that one row or sample holds fewer than 2^31 elements.
template <typename F>
cudaError_t for_each_vector_launch(int64_t n, int64_t c, int64_t s, Layout layout, int kV, F&& launch) {
  const bool first = layout == Layout::kChannelsFirst;
  const int64_t unit = first ? s : c * s;  // elements per row (channels-first) or per sample
  const int64_t units = first ? n * c : n;
  const int64_t per_launch = kMaxLaunchElements / unit;  // whole rows or samples per launch
  const FastDivmod per_row = FastDivmod::make(static_cast<uint32_t>(first ? s / kV : c / kV));
  const FastDivmod per_sample = FastDivmod::make(static_cast<uint32_t>(s));
  for (int64_t u0 = 0; u0 < units; u0 += per_launch) {
    const int64_t count = std::min(per_launch, units - u0);
    VectorLaunch l;
    l.e0 = u0 * unit;
    l.nc0 = first ? u0 : u0 * c;
    l.vectors = static_cast<uint32_t>(count * unit / kV);
    // Vectors per thread: up to 16 (coefficients reused along a row), while keeping >= 1024 blocks
    // (about 8 per SM on an H100) where the tensor allows. FASTLATENT_GROUP_NORM_VECTORS_PER_THREAD
    // (1-16) overrides it, so tests reach the multi-vector path with small tensors.
    int64_t per_thread_wanted = l.vectors / (int64_t{kThreads} * 1024);
    if (const char* forced = std::getenv("FASTLATENT_GROUP_NORM_VECTORS_PER_THREAD")) {
      per_thread_wanted = std::atoi(forced);
    }
    l.per_thread = static_cast<uint32_t>(std::min<int64_t>(16, std::max<int64_t>(1, per_thread_wanted)));
    const uint32_t per_block = kThreads * l.per_thread;
    l.blocks = (l.vectors + per_block - 1) / per_block;
    const cudaError_t err = launch(l, per_row, per_sample);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The forward apply pass (after the statistics): affine_kernel expands mean, rstd, weight and bias per
// (n, c), then apply_kernel runs over the launches of for_each_vector_launch. Layouts it cannot
// vectorise, or a single row/sample of 2^31 elements or more, take the scalar 64-bit elementwise_kernel.
// The packed (mean, scale, shift, 0) array of the channels-first path spans the workspace's scale, shift,
// A and B regions (4 * align_up(n c floats) >= n c float4s).
template <typename T, Activation A>
cudaError_t launch_apply(const T* x, const T* residual, T* out, const float* mean, const float* rstd,
                         const float* weight, const float* bias, const Workspace& w, int64_t n, int64_t c,
                         int64_t s, int64_t groups, Layout layout, cudaStream_t stream) {
  constexpr int kV = Vec<T>::kSize;
  const bool first = layout == Layout::kChannelsFirst;
  const int64_t unit = first ? s : c * s;
  const bool vectorised = can_vectorize(layout, c, s, kV, x, residual, out) && unit <= kMaxLaunchElements;
  float4* packed = vectorised && first ? reinterpret_cast<float4*>(w.scale) : nullptr;
  affine_kernel<<<grid_for(n * c), kThreads, 0, stream>>>(mean, rstd, weight, bias, n, c, groups, w.scale,
                                                         w.shift, w.centre(), packed);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (!vectorised) {
    elementwise_kernel<T, A, false><<<grid_for(n * c * s), kThreads, 0, stream>>>(
        x, residual, out, w.scale, w.shift, nullptr, mean, nullptr, nullptr, nullptr, n, c, s, groups,
        layout);
    return cudaGetLastError();
  }
  return for_each_vector_launch(n, c, s, layout, kV, [&](const VectorLaunch& l, FastDivmod per_row,
                                                         FastDivmod per_sample) {
    const T* res = residual ? residual + l.e0 : nullptr;
    return FL_BOOL_SWITCH(residual != nullptr, kResidual, [&] {
      if (first) {
        apply_kernel<T, A, Layout::kChannelsFirst, kResidual><<<l.blocks, kThreads, 0, stream>>>(
            x + l.e0, res, out + l.e0, packed + l.nc0, nullptr, nullptr, nullptr, l.vectors, l.per_thread,
            per_row, per_sample, static_cast<uint32_t>(c));
      } else {
        apply_kernel<T, A, Layout::kChannelsLast, kResidual><<<l.blocks, kThreads, 0, stream>>>(
            x + l.e0, res, out + l.e0, nullptr, w.centre() + l.nc0, w.scale + l.nc0, w.shift + l.nc0,
            l.vectors, l.per_thread, per_row, per_sample, static_cast<uint32_t>(c));
      }
      return cudaGetLastError();
    });
  });
}

// The backward's elementwise pass (after the merges): backward_coefficients_kernel folds mean, rstd,
// weight, A/m and B/m per (n, c) into the workspace's coefficient region, then backward_apply_kernel runs
// over the launches of for_each_vector_launch, on 16-byte vectors where the layout and alignment allow and
// on single elements otherwise. Only a single row/sample of 2^31 elements or more takes the 64-bit
// elementwise_kernel.
template <typename T, Activation A>
cudaError_t launch_backward_apply(const T* x, const T* dy, T* dx, const float* mean, const float* rstd,
                                  const float* weight, const Workspace& w, int64_t n, int64_t c, int64_t s,
                                  int64_t groups, Layout layout, cudaStream_t stream) {
  const bool first = layout == Layout::kChannelsFirst;
  if ((first ? s : c * s) > kMaxLaunchElements) {
    elementwise_kernel<T, A, true><<<grid_for(n * c * s), kThreads, 0, stream>>>(
        x, dy, dx, w.scale, w.shift, weight, mean, rstd, w.a_over_m, w.b_over_m, n, c, s, groups, layout);
    return cudaGetLastError();
  }
  BackwardCoefficients k{};
  if (first) {
    k.packed = reinterpret_cast<float4*>(w.coefficients);
  } else {
    const size_t stride = align_up(static_cast<size_t>(n) * c * sizeof(float)) / sizeof(float);
    k.centre = w.coefficients;
    k.k_dz = k.centre + stride;
    k.k_v = k.k_dz + stride;
    k.k_0 = k.k_v + stride;
  }
  backward_coefficients_kernel<<<grid_for(n * c), kThreads, 0, stream>>>(mean, rstd, weight, w.a_over_m,
                                                                         w.b_over_m, n, c, groups, k);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const bool vectorised = can_vectorize(layout, c, s, Vec<T>::kSize, x, dy, dx);
  return FL_BOOL_SWITCH(vectorised, kVectorised, [&] {
    constexpr int kV = kVectorised ? Vec<T>::kSize : 1;
    return for_each_vector_launch(n, c, s, layout, kV, [&](const VectorLaunch& l, FastDivmod per_row,
                                                           FastDivmod per_sample) {
      BackwardCoefficients kl = k;
      if (first) {
        kl.packed += l.nc0;
      } else {
        kl.centre += l.nc0, kl.k_dz += l.nc0, kl.k_v += l.nc0, kl.k_0 += l.nc0;
      }
      if (first) {
        backward_apply_kernel<T, A, Layout::kChannelsFirst, kV><<<l.blocks, kThreads, 0, stream>>>(
            x + l.e0, dy + l.e0, dx + l.e0, kl, w.scale + l.nc0, w.shift + l.nc0, l.vectors, l.per_thread,
            per_row, per_sample, static_cast<uint32_t>(c));
      } else {
        backward_apply_kernel<T, A, Layout::kChannelsLast, kV><<<l.blocks, kThreads, 0, stream>>>(
            x + l.e0, dy + l.e0, dx + l.e0, kl, w.scale + l.nc0, w.shift + l.nc0, l.vectors, l.per_thread,
            per_row, per_sample, static_cast<uint32_t>(c));
      }
      return cudaGetLastError();
    });
  });
}

template <typename T, bool Backward, Activation A>
cudaError_t launch_reduce(const T* x, const T* dy, const float* scale, const float* shift, const float* mean,
                          const float* rstd, int64_t n, int64_t c, int64_t s, int64_t groups, Layout layout,
                          float2* partials, cudaStream_t stream) {
  const int64_t splits = splits_of(s, layout);
  // The forward statistics read 16-byte vectors where the layout allows (the backward reads elements).
  const bool vectorised = !Backward && can_vectorize(layout, c, s, Vec<T>::kSize, x, nullptr, nullptr);
  if (layout == Layout::kChannelsFirst) {
    reduce_cf_kernel<T, Backward, A><<<static_cast<unsigned int>(n * c * splits), kThreads, 0, stream>>>(
        x, dy, scale, shift, mean, rstd, c, s, groups, splits, vectorised, partials);
  } else {
    const dim3 grid(static_cast<unsigned int>(n * splits), static_cast<unsigned int>((c + kChannelTile - 1) / kChannelTile));
    reduce_cl_kernel<T, Backward, A><<<grid, kThreads, 0, stream>>>(x, dy, scale, shift, mean, rstd, c, s, groups,
                                                                   splits, vectorised, partials);
  }
  return cudaGetLastError();
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
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_apply<T, A>(x, static_cast<const T*>(p.residual), static_cast<T*>(p.out), p.mean, p.rstd,
                            static_cast<const float*>(p.weight), static_cast<const float*>(p.bias), w, p.n,
                            p.c, p.s, p.groups, p.layout, stream);
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
  return launch_apply<T, A>(static_cast<const T*>(p.x), nullptr, static_cast<T*>(p.out), p.mean, p.rstd,
                            static_cast<const float*>(p.weight), static_cast<const float*>(p.bias), w, p.n,
                            p.c, p.s, p.groups, p.layout, stream);
}

template <typename T, Activation A>
cudaError_t backward_typed(const GroupNormBackwardParams& p, cudaStream_t stream) {
  const Workspace w = carve(p.workspace, p.n, p.c, p.s, p.layout);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_out);
  const float* weight = static_cast<const float*>(p.weight);
  affine_kernel<<<grid_for(p.n * p.c), kThreads, 0, stream>>>(p.mean, p.rstd, weight, static_cast<const float*>(p.bias),
                                                             p.n, p.c, p.groups, w.scale, w.shift, nullptr,
                                                             nullptr);
  cudaError_t err = launch_reduce<T, true, A>(x, dy, w.scale, w.shift, p.mean, p.rstd, p.n, p.c, p.s, p.groups,
                                              p.layout, w.partials, stream);
  if (err != cudaSuccess) return err;
  grad_merge_kernel<<<grid_for(std::max(p.c, p.n * p.groups)), kThreads, 0, stream>>>(
      w.partials, weight, p.n, p.c, p.s, p.groups, splits_of(p.s, p.layout), p.grad_weight, p.grad_bias,
      w.a_over_m, w.b_over_m);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_backward_apply<T, A>(x, dy, static_cast<T*>(p.grad_x), p.mean, p.rstd, weight, w, p.n, p.c,
                                     p.s, p.groups, p.layout, stream);
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
  return group_norm_cuda_workspace_bytes(n, c, s) + 4 * align_up(static_cast<size_t>(n) * c * sizeof(float));
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
