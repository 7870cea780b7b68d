// Binding for nearest_code: schema, argument checks, allocation, per-key registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <string_view>
#include <tuple>

#include "checks.h"
#include "code_search_checks.h"
#include "nearest_code.h"

#ifdef FL_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastlatent {
namespace {

constexpr const char* kOp = "nearest_code";

// Checks shared by every device; returns params with sizes and dtype filled in.
NearestCodeParams check_args(const at::Tensor& x, const at::Tensor& codebook, std::string_view metric,
                             std::string_view precision) {
  using namespace torch_glue;
  const CodeSearchShape s = check_code_search_args(x, codebook, kOp);
  NearestCodeParams p;
  p.dtype = s.dtype;
  p.batch = s.batch;
  p.n = s.n;
  p.k = s.k;
  p.d = s.d;
  p.metric = parse_metric(metric, kOp);
  FL_CHECK_VALUE(precision == "ieee" || precision == "tf32", kOp, "precision must be \"ieee\" or \"tf32\", got \"",
                 std::string(precision), "\"");
  p.allow_tf32 = precision == "tf32";
  return p;
}

std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& x) {
  const auto rows = x.sizes().slice(0, x.dim() - 1);  // [N] or [B, N]
  return {at::empty(rows, x.options().dtype(at::kLong)), at::empty(rows, x.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& x, const at::Tensor& codebook,
                                                    std::string_view metric, std::string_view precision) {
  NearestCodeParams p = check_args(x, codebook, metric, precision);  // the CPU always computes in fp32
  const at::Tensor xc = x.contiguous(), cc = codebook.contiguous();
  auto [indices, distances] = allocate_outputs(x);
  p.x = xc.data_ptr();
  p.codebook = cc.data_ptr();
  p.indices = indices.data_ptr<int64_t>();
  p.distances = distances.data_ptr<float>();
  torch_glue::check_status(run_nearest_code_cpu(p));
  return {indices, distances};
}

#ifdef FL_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> nearest_code_cuda(const at::Tensor& x, const at::Tensor& codebook,
                                                     std::string_view metric, std::string_view precision) {
  NearestCodeParams p = check_args(x, codebook, metric, precision);
  FL_CHECK_VALUE(p.batch <= 65535, kOp, "CUDA runs at most 65535 batched searches, got B=", p.batch);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), cc = codebook.contiguous();
  auto [indices, distances] = allocate_outputs(x);
  const at::Tensor workspace = at::empty(
      {static_cast<int64_t>(nearest_code_cuda_workspace_bytes(p.k, p.batch))}, x.options().dtype(at::kByte));
  p.x = xc.data_ptr();
  p.codebook = cc.data_ptr();
  p.indices = indices.data_ptr<int64_t>();
  p.distances = distances.data_ptr<float>();
  p.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(launch_nearest_code_cuda(p, c10::cuda::getCurrentCUDAStream()));
  return {indices, distances};
}
#endif

}  // namespace
}  // namespace fastlatent

TORCH_LIBRARY_FRAGMENT(fastlatent, m) {
  m.def("nearest_code(Tensor x, Tensor codebook, str metric=\"l2\", str precision=\"ieee\") -> "
        "(Tensor indices, Tensor distances)");
}

TORCH_LIBRARY_IMPL(fastlatent, CPU, m) { m.impl("nearest_code", &fastlatent::nearest_code_cpu); }

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) {
  FL_REGISTER_CUDA(m, "nearest_code", &fastlatent::nearest_code_cuda);
}
