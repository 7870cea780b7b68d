// Division of 32-bit indices by a divisor fixed for a launch (torch-free).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlatent {
namespace cuda {

// Division by a divisor d fixed for the launch, as a multiply-high, an add and a shift (Granlund &
// Montgomery, "Division by invariant integers using multiplication", 1994): with l = ceil(log2 d),
// m = ceil(2^(32 + l) / d) lies in [2^32, 2^33); mul = m - 2^32 and q = (umulhi(x, mul) + x) >> l.
// The error e = m d - 2^(32 + l) < d gives x e < 2^(32 + l), so q = floor(x / d) exactly for every
// x < 2^31 (and the sum stays below 2^32). d = 1 is mul = 0, l = 0.
struct FastDivmod {
  uint32_t divisor = 1, mul = 0, shift = 0;

  static FastDivmod make(uint32_t d) {
    FastDivmod f;
    f.divisor = d;
    while ((uint64_t{1} << f.shift) < d) ++f.shift;
    f.mul = static_cast<uint32_t>((((uint64_t{1} << (32 + f.shift)) + d - 1) / d) - (uint64_t{1} << 32));
    return f;
  }
  __host__ __device__ __forceinline__ uint32_t div(uint32_t x) const {
#if defined(__CUDA_ARCH__)
    return (__umulhi(x, mul) + x) >> shift;
#else
    return static_cast<uint32_t>(((static_cast<uint64_t>(x) * mul >> 32) + x) >> shift);
#endif
  }
};

}  // namespace cuda
}  // namespace fastlatent
