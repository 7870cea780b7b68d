// Binding for code_stats: schema, checks, allocation, per-key registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "code_stats.h"

#ifdef FL_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastlatent {
namespace {

constexpr const char* kOp = "code_stats";

CodeStatsParams check_args(const at::Tensor& x, const at::Tensor& indices, int64_t num_codes) {
  using namespace torch_glue;
  check_dim(x, 2, kOp, "x", "[N, D]");
  check_dim(indices, 1, kOp, "indices", "[N]");
  check_same_device(x, indices, kOp, "x", "indices");
  CodeStatsParams p;
  p.dtype = kernel_dtype(x, kOp, "x");
  FL_CHECK_TYPE(indices.scalar_type() == at::kLong, kOp, "indices must be torch.int64, got ",
                python_dtype(indices.scalar_type()));
  FL_CHECK_VALUE(indices.size(0) == x.size(0), kOp, "indices must have one entry per row of x: x is ",
                 x.sizes(), ", indices is ", indices.sizes());
  FL_CHECK_VALUE(num_codes >= 1, kOp, "num_codes must be >= 1, got ", num_codes);
  FL_CHECK_VALUE(x.size(1) >= 1, kOp, "x must have D >= 1, got shape ", x.sizes());
  p.n = x.size(0);
  p.k = num_codes;
  p.d = x.size(1);
  return p;
}

std::tuple<at::Tensor, at::Tensor> allocate(const at::Tensor& x, const CodeStatsParams& p) {
  const auto options = x.options().dtype(at::kFloat);
  return {at::empty({p.k}, options), at::empty({p.k, p.d}, options)};
}

std::tuple<at::Tensor, at::Tensor> code_stats_cpu(const at::Tensor& x, const at::Tensor& indices,
                                                  int64_t num_codes, bool deterministic) {
  CodeStatsParams p = check_args(x, indices, num_codes);
  const at::Tensor xc = x.contiguous(), ic = indices.contiguous();
  auto [counts, sums] = allocate(x, p);
  p.x = xc.data_ptr();
  p.indices = ic.data_ptr<int64_t>();
  p.counts = counts.data_ptr<float>();
  p.sums = sums.data_ptr<float>();
  p.deterministic = deterministic;  // the CPU kernel always is
  torch_glue::check_status(run_code_stats_cpu(p));
  return {counts, sums};
}

#ifdef FL_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> code_stats_cuda(const at::Tensor& x, const at::Tensor& indices,
                                                   int64_t num_codes, bool deterministic) {
  CodeStatsParams p = check_args(x, indices, num_codes);
  FL_CHECK_VALUE(p.n < (int64_t{1} << 31), kOp, "x must have fewer than 2^31 rows on CUDA, got ", p.n);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), ic = indices.contiguous();
  auto [counts, sums] = allocate(x, p);
  const at::Tensor workspace = at::empty(
      {static_cast<int64_t>(code_stats_cuda_workspace_bytes(p.n, p.k, p.d, deterministic)) + 1},
      x.options().dtype(at::kByte));
  p.x = xc.data_ptr();
  p.indices = ic.data_ptr<int64_t>();
  p.counts = counts.data_ptr<float>();
  p.sums = sums.data_ptr<float>();
  p.deterministic = deterministic;
  p.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(launch_code_stats_cuda(p, c10::cuda::getCurrentCUDAStream()));
  return {counts, sums};
}
#endif

}  // namespace
}  // namespace fastlatent

TORCH_LIBRARY_FRAGMENT(fastlatent, m) {
  m.def("code_stats(Tensor x, Tensor indices, int num_codes, bool deterministic=True) -> (Tensor counts, Tensor sums)");
}

TORCH_LIBRARY_IMPL(fastlatent, CPU, m) { m.impl("code_stats", &fastlatent::code_stats_cpu); }

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) { FL_REGISTER_CUDA(m, "code_stats", &fastlatent::code_stats_cuda); }
