// Binding for sample_code: schema, argument checks, allocation, per-key registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <string_view>

#include "checks.h"
#include "sample_code.h"

#ifdef FL_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastlatent {
namespace {

constexpr const char* kOp = "sample_code";

// Checks shared by every device; returns params with sizes, dtype, temperature and noise key filled in.
SampleCodeParams check_args(const at::Tensor& x, const at::Tensor& codebook, double temperature, int64_t seed,
                            int64_t offset, std::string_view metric) {
  using namespace torch_glue;
  // [N, D] against [K, D], or `batch` independent draws at once: [B, N, D] against [B, K, D].
  const bool batched = x.dim() == 3;
  if (batched) {
    check_dim(codebook, 3, kOp, "codebook", "[B, K, D] (x is batched [B, N, D])");
  } else {
    check_dim(x, 2, kOp, "x", "[N, D] or [B, N, D]");
    check_dim(codebook, 2, kOp, "codebook", "[K, D]");
  }
  check_same_device(x, codebook, kOp, "x", "codebook");
  SampleCodeParams p;
  p.dtype = kernel_dtype(x, kOp, "x");
  check_same_dtype(x, codebook, kOp, "x", "codebook");
  const int64_t kd = codebook.dim() - 1, xd = x.dim() - 1;
  if (batched) {
    FL_CHECK_VALUE(x.size(0) == codebook.size(0), kOp, "x is [B, N, D] with B=", x.size(0),
                   " but codebook is [B, K, D] with B=", codebook.size(0));
  }
  FL_CHECK_VALUE(codebook.size(kd - 1) >= 1, kOp, "codebook must hold at least one code (K >= 1), got shape ",
                 codebook.sizes());
  FL_CHECK_VALUE(x.size(xd) >= 1, kOp, "x must have D >= 1, got shape ", x.sizes());
  FL_CHECK_VALUE(x.size(xd) == codebook.size(kd), kOp, "x is [N, D] with D=", x.size(xd),
                 " but codebook is [K, D] with D=", codebook.size(kd));
  FL_CHECK_VALUE(codebook.size(kd - 1) < (int64_t{1} << 31) - 64, kOp, "codebook must hold fewer than 2^31 codes");
  const double inv_temperature = 1.0 / temperature;
  FL_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0 && std::isfinite(static_cast<float>(inv_temperature)) &&
                     static_cast<float>(inv_temperature) > 0.0f,
                 kOp, "temperature must be a finite float > 0 (use nearest_code for temperature 0), got ", temperature);
  FL_CHECK_VALUE(metric == "l2" || metric == "cosine", kOp, "metric must be \"l2\" or \"cosine\", got \"",
                 std::string(metric), "\"");
  p.batch = batched ? x.size(0) : 1;
  p.n = x.size(xd - 1);
  p.k = codebook.size(kd - 1);
  p.d = x.size(xd);
  p.inv_temperature = static_cast<float>(inv_temperature);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.metric = metric == "l2" ? Metric::kL2 : Metric::kCosine;
  return p;
}

at::Tensor allocate_indices(const at::Tensor& x) {
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));  // [N] or [B, N]
}

at::Tensor sample_code_cpu(const at::Tensor& x, const at::Tensor& codebook, double temperature, int64_t seed,
                           int64_t offset, std::string_view metric) {
  SampleCodeParams p = check_args(x, codebook, temperature, seed, offset, metric);
  const at::Tensor xc = x.contiguous(), cc = codebook.contiguous();
  at::Tensor indices = allocate_indices(x);
  p.x = xc.data_ptr();
  p.codebook = cc.data_ptr();
  p.indices = indices.data_ptr<int64_t>();
  torch_glue::check_status(run_sample_code_cpu(p));
  return indices;
}

#ifdef FL_WITH_CUDA
at::Tensor sample_code_cuda(const at::Tensor& x, const at::Tensor& codebook, double temperature, int64_t seed,
                            int64_t offset, std::string_view metric) {
  SampleCodeParams p = check_args(x, codebook, temperature, seed, offset, metric);
  FL_CHECK_VALUE(p.batch <= 65535, kOp, "CUDA runs at most 65535 batched draws, got B=", p.batch);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), cc = codebook.contiguous();
  at::Tensor indices = allocate_indices(x);
  p.x = xc.data_ptr();
  p.codebook = cc.data_ptr();
  p.indices = indices.data_ptr<int64_t>();
  C10_CUDA_CHECK(launch_sample_code_cuda(p, c10::cuda::getCurrentCUDAStream()));
  return indices;
}
#endif

}  // namespace
}  // namespace fastlatent

TORCH_LIBRARY_FRAGMENT(fastlatent, m) {
  m.def("sample_code(Tensor x, Tensor codebook, float temperature, int seed, int offset=0, str metric=\"l2\") -> "
        "Tensor");
}

TORCH_LIBRARY_IMPL(fastlatent, CPU, m) { m.impl("sample_code", &fastlatent::sample_code_cpu); }

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) {
  FL_REGISTER_CUDA(m, "sample_code", &fastlatent::sample_code_cuda);
}
