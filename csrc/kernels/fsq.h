// Finite scalar quantisation (Mentzer et al. 2024, https://arxiv.org/abs/2309.15505).
//
// Math, per element z of channel i with L = levels[i] (z[..., d] channel-last):
//   default bound (the paper's, as vector-quantize-pytorch's FSQ.bound, eps = 1e-3):
//     half_l = (L - 1) (1 + eps) / 2,  offset = (L even) ? 0.5 : 0,  shift = atanh(offset / half_l)
//     y = tanh(z + shift) * half_l - offset,  q = round_half_even(y) in {-L/2 .. (L-1)/2}
//     z_hat = q / (L / 2)   (integer division L / 2),  level k = q + L / 2 in [0, L)
//     d z_hat / d z (straight-through round) = (1 - tanh^2(z + shift)) * half_l / (L / 2)
//   preserve_symmetry (vector-quantize-pytorch's symmetry_preserving_bound, arXiv:2411.19842):
//     y = (L - 1) (tanh(z) + 1) / 2 + 0.5,  k = floor(y) in [0, L),  z_hat = (2k - (L - 1)) / (L - 1)
//     d z_hat / d z (straight-through floor) = 1 - tanh^2(z)
//   index = sum_i k_i * basis_i with basis_i = prod_{j < i} L_j (channel 0 least significant, as
//   vector-quantize-pytorch), int64; prod L_i <= 2^31 is checked by the binding.
//
// Exactness: y is evaluated in fp32 with a tanh accurate to a few ulp; an element whose y lies
// within kFsqBoundaryTol * (half_l + 1) of a rounding boundary is re-evaluated in fp64, so z_hat
// and the indices equal the fp64 reference (fastlatent/reference/fsq.py) bit for bit. The value
// is then formed in fp32 from the integer level ((float)q / (float)(L/2), or the symmetric
// formula) and rounded once to the output dtype.
//
// NaN and Inf: +Inf / -Inf saturate to the top / bottom level (gradient 0). A NaN element gives
// a NaN z_hat element, index -1 for its row, and a NaN gradient. fsq_indices_to_codes maps any
// index outside [0, prod L) to a row of NaN codes, so NaN rows round-trip.
//
// Layout: z, z_hat, grad tensors [rows, d] contiguous; indices [rows] int64.
// Thread mapping: CPU: OpenMP over chunks of rows; inside a chunk the per-channel constants are
//   tiled to the chunk so the element loop is one flat, vectorisable loop. CUDA: forward and
//   indices_to_codes stage a tile of 128 rows in shared memory with 16-byte loads/stores, one
//   thread per element (one per row for the index); backward is a flat 16-byte-vector
//   elementwise kernel. Grid-stride loops, 64-bit offsets.
// Accumulation: fp32 for fp32/fp16/bf16 inputs (fp64 for double, CPU only); the index is an
//   exact int64 sum. Every output element depends on its own row only: deterministic.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastlatent {

// Levels are >= 2 and their product <= 2^31, so there are at most 31 channels.
constexpr int kFsqMaxDims = 31;
constexpr double kFsqBoundEps = 1e-3;
// Half-width of the band around a rounding boundary where fp32 is not trusted, relative to
// (half_l + 1): the fp32 tanh errs by at most ~1e-6 absolute, so 2^-16 leaves a wide margin.
constexpr double kFsqBoundaryTol = 1.0 / 65536;

// Per-channel constants, computed on the host once per call (fsq_make_constants).
struct FsqChannel {
  float shift_f, half_l_f, offset_f, inv_scale_f;  // fp32 bound; code = q / hw
  float grad_scale_f;                              // half_l / hw (or 1 when symmetric)
  float tol_f;                                     // boundary band for this channel
  double shift, half_l, offset, grad_scale;        // fp64 bound (fallback and double inputs)
  int64_t levels;                                  // L (up to 2^31: an int32 would overflow)
  int64_t half_width;                              // L / 2 (default bound)
  int64_t basis;                                   // prod of the levels before this channel
};

struct FsqParams {
  int64_t rows = 0;                   // product of the leading dims
  int d = 0;                          // channels, 1..kFsqMaxDims
  bool preserve_symmetry = false;
  DType dtype = DType::kFloat32;
  int64_t codebook_size = 0;          // prod levels
  FsqChannel channel[kFsqMaxDims];
};

// Fills params.channel / codebook_size from levels (already validated: >= 2, product <= 2^31).
void fsq_make_constants(const int64_t* levels, int d, bool preserve_symmetry, FsqParams& params);

struct FsqForwardArgs {
  const void* z = nullptr;   // [rows, d], dtype
  void* z_hat = nullptr;     // [rows, d], dtype
  int64_t* indices = nullptr;  // [rows]
};

struct FsqBackwardArgs {
  const void* grad_z_hat = nullptr;  // [rows, d], dtype
  const void* z = nullptr;           // [rows, d], dtype
  void* grad_z = nullptr;            // [rows, d], dtype
};

struct FsqCodesArgs {
  const int64_t* indices = nullptr;  // [rows]
  void* codes = nullptr;             // [rows, d], dtype
};

Status run_fsq_quantize_cpu(const FsqParams& params, const FsqForwardArgs& args);
Status run_fsq_quantize_backward_cpu(const FsqParams& params, const FsqBackwardArgs& args);
Status run_fsq_indices_to_codes_cpu(const FsqParams& params, const FsqCodesArgs& args);

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
cudaError_t launch_fsq_quantize_cuda(const FsqParams& params, const FsqForwardArgs& args,
                                     cudaStream_t stream);
cudaError_t launch_fsq_quantize_backward_cuda(const FsqParams& params, const FsqBackwardArgs& args,
                                              cudaStream_t stream);
cudaError_t launch_fsq_indices_to_codes_cuda(const FsqParams& params, const FsqCodesArgs& args,
                                             cudaStream_t stream);
#endif

}  // namespace fastlatent
