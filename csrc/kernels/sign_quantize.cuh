// The sign quantisation shared by LFQ and BSQ (CUDA): per row of d <= 64 elements, out[i] = +mag or -mag
// by the sign of x[i] (> 0), and the row's index with bit d - 1 - i set where x[i] > 0.
//
// Coalesced: a warp takes a group of consecutive rows, which are consecutive elements: for d <= 32,
// 32 / d whole rows with one element per lane; for d > 32, one row with two elements per lane. A
// row's bits come from one __ballot_sync (two for d > 32) and are bit-reversed into the index, so no
// lane walks a row serially; each warp load and store covers one contiguous span. Bitwise the same
// values as a thread per row: the same per-element comparisons, the same bit positions.
#pragma once

#include <cstdint>

#include "cuda_utils.cuh"

namespace fastlatent {
namespace cuda {

// kRowNan (BSQ): a row with any non-finite element is NaN throughout and has index -1.
// !kRowNan (LFQ): a NaN element is NaN in out; a row with a NaN has index -1.
template <bool kRowNan, typename T>
__device__ __forceinline__ void sign_quantize_rows(const T* __restrict__ x, T* __restrict__ out,
                                                   int64_t* __restrict__ indices, int64_t n, int d,
                                                   float mag) {
  const T pos = from_float<T>(mag), neg = from_float<T>(-mag);
  const T nan = from_float<T>(__int_as_float(0x7fc00000));
  const int lane = threadIdx.x & 31;
  const bool wide = d > 32;
  const int rows = wide ? 1 : 32 / d;  // rows per warp step
  const int row = wide ? 0 : lane / d;  // this lane's row within the step, and its column
  const int col = wide ? lane : lane - row * d;
  const bool lane_used = row < rows;
  const int shift = row * d;
  const uint64_t row_mask = d == 64 ? ~uint64_t{0} : (uint64_t{1} << d) - 1;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  for (int64_t r0 = first * rows; r0 < n; r0 += warps * rows) {  // uniform per warp: every lane ballots
    const int64_t r = r0 + row;
    const bool live0 = lane_used && r < n;
    const bool live1 = live0 && wide && col + 32 < d;
    const int64_t e = r * d + col;
    const float v0 = live0 ? to_float(x[e]) : 0.0f;
    const float v1 = live1 ? to_float(x[e + 32]) : 0.0f;
    const bool bad0 = kRowNan ? !isfinite(v0) : isnan(v0);
    const bool bad1 = kRowNan ? !isfinite(v1) : isnan(v1);
    const uint64_t pos_bits = __ballot_sync(0xffffffffu, v0 > 0.0f) |
                              (static_cast<uint64_t>(__ballot_sync(0xffffffffu, v1 > 0.0f)) << 32);
    const uint64_t bad_bits = __ballot_sync(0xffffffffu, bad0) |
                              (static_cast<uint64_t>(__ballot_sync(0xffffffffu, bad1)) << 32);
    const bool row_bad = ((bad_bits >> shift) & row_mask) != 0;
    if (live0) out[e] = (kRowNan ? row_bad : bad0) ? nan : (v0 > 0.0f ? pos : neg);
    if (live1) out[e + 32] = (kRowNan ? row_bad : bad1) ? nan : (v1 > 0.0f ? pos : neg);
    if (live0 && col == 0) {
      // bit i of the row (element i) -> bit d - 1 - i; the reversal moves other rows' bits below 64 - d
      indices[r] = row_bad ? -1 : static_cast<int64_t>(__brevll(pos_bits >> shift) >> (64 - d));
    }
  }
}

// Blocks for sign_quantize_rows: a block of `threads` covers threads / 32 warp steps per pass.
inline unsigned int sign_quantize_blocks(int64_t n, int d, int threads) {
  const int64_t rows_per_block = static_cast<int64_t>(threads / 32) * (d > 32 ? 1 : 32 / d);
  return grid_blocks((n + rows_per_block - 1) / rows_per_block);
}

}  // namespace cuda
}  // namespace fastlatent
