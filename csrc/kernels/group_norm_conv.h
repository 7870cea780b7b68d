// group_norm_conv3x3: a GroupNorm (+ activation) folded into the input load of the 3x3
// convolution that follows it, for inference decoding (CUDA, fp16/bf16 tensor cores).
//
//   y   = act((x - mean[n, g]) * rstd[n, g] * gn_weight[c] + gn_bias[c])     never stored
//   out = conv2d(y, conv_weight, conv_bias, stride 1, padding 1) + residual
//
// x: [n, cin, h, w] with any strides (NCHW or channels-last); out and residual: [n, cout, h, w]
// with any strides. The statistics come from group_norm_stats (mean and M2 per group, fp32);
// rstd = 1 / sqrt(M2 / count + eps) is formed in the kernel's prologue.
//
// The convolution is an implicit GEMM, M = output pixels, N = cout, K = 9 * cin, on WMMA
// 16x16x16 fragments with fp32 accumulation. A block owns an 8 x 16 tile of output pixels of one
// image and 128 output channels. Per chunk of 32 input channels it loads the 10 x 18 input halo
// once, normalises and activates it while loading (zero outside the image: the convolution pads
// the activated tensor), and keeps it in shared memory; each of the 9 taps then reads its A
// fragments from the halo at a constant pixel stride, so the activation is computed once per
// halo element rather than once per tap. B (weights) tiles stream in with cp.async, double
// buffered. The epilogue adds the conv bias and the residual and stores in the output dtype.
//
// Weights are packed by the caller: packed[chunk][tap][k][cout_pad] = W[co, chunk * 32 + k, r, s]
// with tap = 3 r + s, zero where ci >= cin or co >= cout; cout_pad is cout rounded up to 128.
#pragma once

#include <cstddef>
#include <cstdint>

#include "activations.h"
#include "common.h"

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastlatent {

constexpr int64_t kGnConvChannelChunk = 32;   // input channels per K chunk (packing granularity of cin)
constexpr int64_t kGnConvCoutTile = 128;      // output channels per block (packing granularity of cout)
// Shared memory holds a mean, scale and shift per input channel: 33.9 KiB of tiles + 12 bytes per
// channel stays within the 99 KiB a block may opt into on sm_86/sm_89 up to 5,600 channels.
constexpr int64_t kGnConvMaxInChannels = 4096;

struct GroupNormConvParams {
  const void* x = nullptr;              // [n, cin, h, w], strides x_stride (elements), dtype
  int64_t x_stride[4] = {0, 0, 0, 0};
  const float* mean = nullptr;          // [n, groups]
  const float* m2 = nullptr;            // [n, groups]: sum over the group of (x - mean)^2
  const float* gn_weight = nullptr;     // [cin] or null (= 1)
  const float* gn_bias = nullptr;       // [cin] or null (= 0)
  const void* packed_weight = nullptr;  // see above, dtype
  const float* conv_bias = nullptr;     // [cout] or null
  const void* residual = nullptr;       // [n, cout, h, w] or null, dtype
  int64_t residual_stride[4] = {0, 0, 0, 0};
  void* out = nullptr;                  // [n, cout, h, w], dtype
  int64_t out_stride[4] = {0, 0, 0, 0};
  int64_t n = 0, cin = 0, cout = 0, h = 0, w = 0, groups = 1;
  float eps = 1e-5f;
  DType dtype = DType::kFloat16;        // kFloat16 or kBFloat16
  Activation activation = Activation::kNone;
};

// The weight packing's input: conv_weight [cout, cin, 3, 3] with any strides (elements), 16-bit dtype.
struct GnConvWeightPackParams {
  const void* w = nullptr;
  int64_t w_stride[4] = {0, 0, 0, 0};
  void* packed = nullptr;  // gn_conv_packed_weight_elements(cout, cin) elements, 16-byte aligned
  int64_t cout = 0, cin = 0;
  int dtype_bytes = 2;  // the packing copies bits: 2 (fp16 / bf16) only
};

inline int64_t gn_conv_round_up(int64_t v, int64_t multiple) { return (v + multiple - 1) / multiple * multiple; }

// Elements of the packed weights: cin rounded up to 32, times 9 taps, times cout rounded up to 128.
inline int64_t gn_conv_packed_weight_elements(int64_t cout, int64_t cin) {
  return gn_conv_round_up(cin, kGnConvChannelChunk) * 9 * gn_conv_round_up(cout, kGnConvCoutTile);
}

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
// cudaErrorInvalidValue for sizes or dtypes the kernel does not take (checked by the binding first),
// cudaErrorNotSupported where group_norm_conv3x3_cuda_arch is below 80.
cudaError_t launch_group_norm_conv3x3_cuda(const GroupNormConvParams& params, cudaStream_t stream);

// Packs conv_weight into the layout above, padding included, on the stream (one small kernel; every
// element of the workspace is written, so it needs no zero fill). Called per convolution: the weights
// are never cached across calls, as users may change them in place.
cudaError_t launch_group_norm_conv3x3_pack_weight_cuda(const GnConvWeightPackParams& params,
                                                       cudaStream_t stream);

// The architecture (PTX version, e.g. 80) the kernel's image for the current device was compiled
// for; read once per device. The kernel needs 80 or more (bf16 WMMA, cp.async): below, as on a
// pre-Ampere GPU or with a TORCH_CUDA_ARCH_LIST of 7.5 only (a newer GPU then JIT-compiles the
// compute_75 PTX), its body is a trap.
cudaError_t group_norm_conv3x3_cuda_arch(int* arch);
#endif

}  // namespace fastlatent
