// Binding for sample_code: schema, argument checks, allocation, per-key registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <string_view>

#include "checks.h"
#include "code_search_checks.h"
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
  const CodeSearchShape s = check_code_search_args(x, codebook, kOp);
  SampleCodeParams p;
  p.dtype = s.dtype;
  FL_CHECK_VALUE(s.k < (int64_t{1} << 31) - 64, kOp, "codebook must hold fewer than 2^31 codes");
  const double inv_temperature = 1.0 / temperature;
  FL_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0 && std::isfinite(static_cast<float>(inv_temperature)) &&
                     static_cast<float>(inv_temperature) > 0.0f,
                 kOp, "temperature must be a finite float > 0 (use nearest_code for temperature 0), got ", temperature);
  p.metric = parse_metric(metric, kOp);
  p.batch = s.batch;
  p.n = s.n;
  p.k = s.k;
  p.d = s.d;
  p.inv_temperature = static_cast<float>(inv_temperature);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
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
