// nearest_code: for every row x_n of x[N, D], the index of the closest codebook row.
//
//   metric l2:     k*(n) = argmin_k ||x_n - c_k||^2
//                  evaluated as argmin_k (||c_k||^2 - 2 <x_n, c_k>) (||x_n||^2 is constant per row)
//   metric cosine: k*(n) = argmin_k (1 - <x_n, c_k> / (max(||x_n||, eps) max(||c_k||, eps)))
//                  evaluated as argmin_k (-<x_n, c_k> / max(||c_k||, eps))
//
// Both are the same computation: key(n, k) = beta[k] + alpha[k] * <x_n, c_k>, with per-code
// alpha/beta precomputed once. The N x K key matrix is never stored; each row keeps a
// running (key, index) minimum while the codebook streams past.
//
// The distance returned for the chosen code is recomputed directly (sum of squared
// differences, or 1 - cosine) in fp32, so it does not suffer the cancellation of the
// expanded form.
//
// Batched form: `batch` independent searches (one per head of a multi-head quantiser), x[b] against
// codebook[b], in one call: x is [batch, n, d], codebook [batch, k, d], the outputs [batch, n].
// The CPU runs the searches one after another, each over all threads; CUDA puts the search
// index on gridDim.y, so every kernel of the search is launched once for all of them.
//
// Numerics and determinism:
//   * inputs may be fp32, fp16 or bf16; all products and sums are fp32.
//   * ties go to the lowest index; the result does not depend on thread count or schedule.
//   * a key is NaN when row n or code k holds a NaN or Inf. A NaN key wins over every
//     number (as torch.argmin treats NaN), lowest index first. So a non-finite row maps to
//     code 0, and a non-finite code captures every finite row. The distance is then
//     non-finite too.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastlatent {

enum class Metric : int { kL2 = 0, kCosine = 1 };

// Clamp on norms in the cosine metric, as torch.nn.functional.normalize.
constexpr float kCosineEps = 1e-12f;

struct NearestCodeParams {
  const void* x = nullptr;         // [n, d] row-major, contiguous, element type `dtype`
  const void* codebook = nullptr;  // [k, d] row-major, contiguous, element type `dtype`
  int64_t* indices = nullptr;      // [n] output
  float* distances = nullptr;      // [n] output: squared L2, or 1 - cosine similarity
  int64_t n = 0;
  int64_t k = 0;                   // >= 1
  int64_t d = 0;                   // >= 1
  int64_t batch = 1;               // independent searches: x [batch, n, d], codebook [batch, k, d],
                                   // indices/distances [batch, n]; CUDA: <= 65535 (gridDim.y)
  DType dtype = DType::kFloat32;
  Metric metric = Metric::kL2;
  // CUDA only: fp32 inputs may use TF32 tensor cores (10-bit mantissa products, fp32 sums)
  // instead of exact fp32 FMAs. fp16/bf16 inputs use tensor cores where d, the pointers'
  // alignment and the build's architectures allow (nearest_code_cuda_path).
  bool allow_tf32 = false;
  // CUDA only: scratch of nearest_code_cuda_workspace_bytes(k, batch) bytes on the device,
  // aligned to 16 bytes. The CPU kernel manages its own scratch.
  void* workspace = nullptr;
};

Status run_nearest_code_cpu(const NearestCodeParams& params);

// The search kernel launch_nearest_code_cuda runs (see nearest_code_cuda.cu).
enum class NearestCodeCudaPath : int { kSmallD = 0, kTensorCore = 1, kSimt = 2 };

// Lowest architecture (compute capability x 10) whose WMMA takes `dtype`: fp16 since Volta,
// bf16 and TF32 since Ampere.
inline int nearest_code_tensor_core_min_arch(DType dtype) { return dtype == DType::kFloat16 ? 70 : 80; }

// The search path for `params`. `tensor_core_arch` is the architecture the tensor-core kernel's
// image for the current device was compiled for (its PTX version, e.g. 75 for a compute_75 build,
// also where a newer GPU JIT-compiles that PTX): a build whose TORCH_CUDA_ARCH_LIST includes 7.5
// holds no bf16/TF32 WMMA in that image, so such calls take the SIMT path. The tile loader reads
// 16 bytes at a time, so x and codebook must start on a 16-byte boundary (a view with a storage
// offset need not): otherwise the SIMT path too. Pure and host-only, so it is unit-tested on
// the CPU.
inline NearestCodeCudaPath nearest_code_cuda_path(const NearestCodeParams& params, int tensor_core_arch) {
  if (params.d <= 32) return NearestCodeCudaPath::kSmallD;
  const bool aligned =
      reinterpret_cast<uintptr_t>(params.x) % 16 == 0 && reinterpret_cast<uintptr_t>(params.codebook) % 16 == 0;
  const bool arch_ok = tensor_core_arch >= nearest_code_tensor_core_min_arch(params.dtype);
  const bool half = params.dtype == DType::kFloat16 || params.dtype == DType::kBFloat16;
  // Rows of a 16-byte multiple keep every vector of an aligned matrix aligned.
  const bool shape_ok = half ? params.d % 8 == 0 : (params.dtype == DType::kFloat32 && params.allow_tf32 &&
                                                     params.d % 4 == 0);
  return aligned && arch_ok && shape_ok ? NearestCodeCudaPath::kTensorCore : NearestCodeCudaPath::kSimt;
}

inline size_t nearest_code_cuda_workspace_bytes(int64_t k, int64_t batch = 1) {
  return static_cast<size_t>(batch) * static_cast<size_t>(k) * 2 * sizeof(float);  // alpha[batch, k], beta[batch, k]
}

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
cudaError_t launch_nearest_code_cuda(const NearestCodeParams& params, cudaStream_t stream);
#endif

}  // namespace fastlatent
