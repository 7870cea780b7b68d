// Turn a runtime DType into a compile-time element type, once, for every op.
// Usage: FL_DTYPE_SWITCH(params.dtype, scalar_t, { run<scalar_t>(params); });
// The CPU element types are fastlatent::Half/BFloat16; CUDA code passes its own
// names through FL_DTYPE_SWITCH_T (e.g. __half, __nv_bfloat16).
#pragma once

#include "common.h"

#define FL_DTYPE_SWITCH_T(DTYPE, NAME, F32, F16, BF16, UNSUPPORTED, ...) \
  [&] {                                                                  \
    switch (DTYPE) {                                                     \
      case ::fastlatent::DType::kFloat32: {                              \
        using NAME = F32;                                                \
        return __VA_ARGS__();                                            \
      }                                                                  \
      case ::fastlatent::DType::kFloat16: {                              \
        using NAME = F16;                                                \
        return __VA_ARGS__();                                            \
      }                                                                  \
      case ::fastlatent::DType::kBFloat16: {                             \
        using NAME = BF16;                                               \
        return __VA_ARGS__();                                            \
      }                                                                  \
      default:                                                           \
        return UNSUPPORTED;                                              \
    }                                                                    \
  }()

// CPU flavour: fp32, fp16, bf16 as the storage structs of common.h.
#define FL_DTYPE_SWITCH(DTYPE, NAME, UNSUPPORTED, ...)                                     \
  FL_DTYPE_SWITCH_T(DTYPE, NAME, float, ::fastlatent::Half, ::fastlatent::BFloat16, \
                    UNSUPPORTED, __VA_ARGS__)

// CPU flavour with float64 as well, for ops whose CPU kernels accept double (gradcheck).
#define FL_DTYPE_SWITCH_WITH_DOUBLE(DTYPE, NAME, UNSUPPORTED, ...)        \
  [&] {                                                                   \
    if ((DTYPE) == ::fastlatent::DType::kFloat64) {                       \
      using NAME = double;                                                \
      return __VA_ARGS__();                                               \
    }                                                                     \
    return FL_DTYPE_SWITCH(DTYPE, NAME, UNSUPPORTED, __VA_ARGS__);        \
  }()

// Compile-time bool from a runtime one (flash-attention's BOOL_SWITCH).
#define FL_BOOL_SWITCH(COND, NAME, ...)   \
  [&] {                                   \
    if (COND) {                           \
      constexpr bool NAME = true;         \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr bool NAME = false;        \
      return __VA_ARGS__();               \
    }                                     \
  }()
