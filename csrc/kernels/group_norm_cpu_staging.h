// Shared by the CPU group_norm forward (group_norm_cpu_forward.cpp) and backward
// (group_norm_cpu_backward.cpp); see group_norm.h for the op and group_norm_cpu_forward.cpp for the
// method. Internal to csrc/kernels: block sizes, the fp16/bf16 staging through fp32 buffers, the
// per-channel affine coefficients, and the size check and dispatch every run_group_norm_*_cpu shares.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "group_norm.h"

namespace fastlatent {
namespace group_norm_cpu {

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

// Channels-first with groups small enough to stay in L2: each task reads its group for the
// statistics and applies the norm while the group is still cached, so x comes from memory
// once. A channels-first group is one contiguous run of per_group * s values, so its shifted
// sums are taken over the whole run with the group's first value as the shift: one Chan step
// instead of one per channel (for small maps, 64x512x8x8, the per-channel double divisions
// cost more than reading the data). The shift lies inside the group's range, so the variance
// is as well conditioned as with per-channel shifts; results agree with the two-pass path to
// rounding.
constexpr int64_t kFusedGroupBytes = 384 * 1024;

inline Status check_sizes(int64_t n, int64_t c, int64_t s, int64_t groups) {
  if (n < 0 || c < 1 || s < 0 || groups < 1 || c % groups != 0)
    return Status::Error("group_norm: need n >= 0, c >= 1, s >= 0, groups >= 1 dividing c");
  return Status::Ok();
}

template <typename T>
struct TypeTag {
  using type = T;
};

// What every run_group_norm*_cpu does: check the sizes, let on_empty handle an input with no
// samples or no positions, else call typed(TypeTag<scalar_t>{}) for the params' dtype (fp64 included).
template <typename Params, typename OnEmpty, typename Typed>
Status run_checked(const Params& p, const char* unsupported_dtype, OnEmpty on_empty, Typed typed) {
  const Status sizes = check_sizes(p.n, p.c, p.s, p.groups);
  if (!sizes.ok) return sizes;
  if (p.n == 0 || p.s == 0) return on_empty();
  return FL_DTYPE_SWITCH_WITH_DOUBLE(p.dtype, scalar_t, Status::Error(unsupported_dtype),
                                     [&] { return typed(TypeTag<scalar_t>{}); });
}

}  // namespace group_norm_cpu
}  // namespace fastlatent
