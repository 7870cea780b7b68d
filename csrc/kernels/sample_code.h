// sample_code: Gumbel-max sampling of a codebook entry for every row of x, fused into the search.
//
//   logit(n, k) = -sqrt(max(||x_n||^2 + ||c_k||^2 - 2 <x_n, c_k>, 1e-8))     metric l2
//               = <x_n, c_k> / (max(||x_n||, eps) max(||c_k||, eps))         metric cosine
//   index(n)    = argmax_k (logit(n, k) / temperature + g(n, k)),  g(n, k) ~ Gumbel(0, 1)
//
// so index(n) = k with probability softmax_k(logit(n, .) / temperature) (Gumbel-max). The l2
// logit is minus the Euclidean distance (not its square) with vector-quantize-pytorch's 1e-8
// clamp, so the distribution is the one its `stochastic_sample_codes` draws from; cosine is
// the cosine similarity. The N x K logit matrix is never stored: each row keeps a running
// (key, index) maximum while the codebook streams past, as in nearest_code.
//
// Noise: g(n, k) is a function of (seed, offset, e) only, e = (b * N + n) * K + k the flat index
// of the [B, N, K] logit it perturbs (Philox4x32-10 of philox.h, counter group e / 4, word e % 4):
//   u = ((word >> 9) + 0.5) / 2^23            in [2^-24, 1 - 2^-24], exact in fp32
//   g = -ln(-ln u)                            with philox.h's IEEE-only logarithm
// so the CPU and CUDA kernels draw identical noise, independent of threads and schedule, and a
// (seed, offset) pair names one draw. The largest g is -ln(-ln(1 - 2^-24)) < 16.7
// (kGumbelMax): a code whose logit / temperature + kGumbelMax is below the running maximum
// cannot win, and its noise is not generated (exact: skipped codes never change the result).
//
// Numerics: inputs fp32, fp16 or bf16; products, sums and keys in fp32. Ties go to the lowest
// index. A key is NaN when row n or code k holds NaN/Inf; NaN wins over every number, lowest
// index first (as torch.argmax), so a non-finite row samples code 0 and a non-finite code
// captures every finite row. Deterministic for a given (seed, offset) on a device; the CPU and
// CUDA keys differ only by the fp32 rounding of the dot products (summation order).
#pragma once

#include <cstdint>

#include "common.h"
#include "nearest_code.h"
#include "philox.h"

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastlatent {

struct SampleCodeParams {
  const void* x = nullptr;         // [batch, n, d] row-major, contiguous, element type `dtype`
  const void* codebook = nullptr;  // [batch, k, d] row-major, contiguous, element type `dtype`
  int64_t* indices = nullptr;      // [batch, n] output
  int64_t n = 0;
  int64_t k = 0;                   // >= 1
  int64_t d = 0;                   // >= 1
  int64_t batch = 1;               // independent searches (heads); CUDA: <= 65535 (gridDim.y)
  float inv_temperature = 1.0f;    // 1 / temperature, finite and > 0
  uint64_t seed = 0;               // Philox key
  uint64_t offset = 0;             // Philox counter high half: one draw per (seed, offset)
  DType dtype = DType::kFloat32;
  Metric metric = Metric::kL2;
};

// vector-quantize-pytorch's clamp of the squared distance before the square root.
constexpr float kSampleCodeMinSquaredDistance = 1e-8f;
// An upper bound of gumbel_noise() over every Philox word (the exact maximum is 16.6355).
constexpr float kGumbelMax = 16.7f;

// The four Philox words of counter group `group` of the stream (seed, offset).
FL_HOST_DEVICE philox::Words gumbel_words(uint64_t seed, uint64_t offset, uint64_t group) {
  return philox::philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                               static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                               static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Gumbel(0, 1) noise from one Philox word (branch-free, so loops over it vectorise on the CPU).
FL_HOST_DEVICE float gumbel_from_word(uint32_t word) {
  const float u = (static_cast<float>(word >> 9) + 0.5f) * 1.1920928955078125e-7f;  // exact
  const float minus_log_u = 0.5f * philox::minus_two_log(u);                          // > 0, normal
  return 0.5f * philox::minus_two_log(minus_log_u);                                   // -ln(-ln u)
}

// The Gumbel(0, 1) noise of logit element `element` of the stream (seed, offset).
FL_HOST_DEVICE float gumbel_noise(uint64_t seed, uint64_t offset, uint64_t element) {
  return gumbel_from_word(gumbel_words(seed, offset, element >> 2).w[element & 3]);
}

// The logit of the header from the search key (nearest_code's beta[k] + alpha[k] <x_n, c_k>) and
// the row's squared norm: l2 key = ||c||^2 - 2 <x, c>, cosine key = -<x, c> / max(||c||, eps).
FL_HOST_DEVICE float sample_code_logit(float key, float x_norm2, Metric metric) {
  if (metric == Metric::kL2) {
    const float sq = x_norm2 + key;
    // NaN stays NaN (the comparison is false for it)
    return -philox::sqrt32(sq <= kSampleCodeMinSquaredDistance ? kSampleCodeMinSquaredDistance : sq);
  }
  const float x_norm = philox::sqrt32(x_norm2);
  return -key / (x_norm > kCosineEps ? x_norm : kCosineEps);
}

Status run_sample_code_cpu(const SampleCodeParams& params);

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
cudaError_t launch_sample_code_cuda(const SampleCodeParams& params, cudaStream_t stream);
#endif

}  // namespace fastlatent
