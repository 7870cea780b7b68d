// Argument checks shared by the codebook searches (nearest_code, sample_code): both take x [N, D] against
// codebook [K, D], or B independent searches at once, x [B, N, D] against codebook [B, K, D], and a metric.
// One checker keeps their messages and check order identical; each op adds its own checks after it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "checks.h"
#include "nearest_code.h"

namespace fastlatent {
namespace torch_glue {

// The sizes and kernel dtype of a checked search.
struct CodeSearchShape {
  DType dtype = DType::kFloat32;
  int64_t batch = 1;  // B, 1 when unbatched
  int64_t n = 0;      // rows of x
  int64_t k = 0;      // codes, >= 1
  int64_t d = 0;      // >= 1
};

// Ranks, device, dtype and sizes of x and codebook, in this order (the fake impls in fastlatent/ops
// repeat it).
inline CodeSearchShape check_code_search_args(const at::Tensor& x, const at::Tensor& codebook,
                                              const char* op) {
  const bool batched = x.dim() == 3;
  if (batched) {
    check_dim(codebook, 3, op, "codebook", "[B, K, D] (x is batched [B, N, D])");
  } else {
    check_dim(x, 2, op, "x", "[N, D] or [B, N, D]");
    check_dim(codebook, 2, op, "codebook", "[K, D]");
  }
  check_same_device(x, codebook, op, "x", "codebook");
  CodeSearchShape s;
  s.dtype = kernel_dtype(x, op, "x");
  check_same_dtype(x, codebook, op, "x", "codebook");
  const int64_t kd = codebook.dim() - 1, xd = x.dim() - 1;
  if (batched) {
    FL_CHECK_VALUE(x.size(0) == codebook.size(0), op, "x is [B, N, D] with B=", x.size(0),
                   " but codebook is [B, K, D] with B=", codebook.size(0));
  }
  FL_CHECK_VALUE(codebook.size(kd - 1) >= 1, op, "codebook must hold at least one code (K >= 1), got shape ",
                 codebook.sizes());
  FL_CHECK_VALUE(x.size(xd) >= 1, op, "x must have D >= 1, got shape ", x.sizes());
  FL_CHECK_VALUE(x.size(xd) == codebook.size(kd), op, "x is [N, D] with D=", x.size(xd),
                 " but codebook is [K, D] with D=", codebook.size(kd));
  s.batch = batched ? x.size(0) : 1;
  s.n = x.size(xd - 1);
  s.k = codebook.size(kd - 1);
  s.d = x.size(xd);
  return s;
}

inline Metric parse_metric(std::string_view metric, const char* op) {
  if (metric == "l2") return Metric::kL2;
  if (metric == "cosine") return Metric::kCosine;
  FL_CHECK_VALUE(false, op, "metric must be \"l2\" or \"cosine\", got \"", std::string(metric), "\"");
  return Metric::kL2;
}

}  // namespace torch_glue
}  // namespace fastlatent
