// Binding for residual_fsq: schema, argument checks, allocation, per-key registration.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "residual_fsq.h"

#ifdef FL_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastlatent {
namespace {

constexpr const char* kOp = "residual_fsq";

// levels as fsq_quantize's (>= 2, product <= 2^31); scales [Q, d] floating on z's device with
// 1 <= Q <= 255. Returns the params and the scales in the kernels' math dtype, contiguous.
std::tuple<ResidualFsqParams, at::Tensor> check_args(const at::Tensor& z, const at::Tensor& scales,
                                                     c10::IntArrayRef levels) {
  FL_CHECK_VALUE(!levels.empty(), kOp, "levels must be a non-empty list of ints, got []");
  int64_t product = 1;
  for (const int64_t level : levels) {
    FL_CHECK_VALUE(level >= 2, kOp, "levels must all be >= 2, got ", levels);
    FL_CHECK_VALUE(level <= (int64_t{1} << 31) / product, kOp,
                   "the product of levels (the implicit codebook size) must be <= 2^31, got ", levels);
    product *= level;
  }
  ResidualFsqParams p;
  p.dtype = torch_glue::kernel_dtype(z, kOp, "z", /*allow_double=*/!z.is_cuda());
  const int d = static_cast<int>(levels.size());
  torch_glue::check_last_dim(z, d, kOp, "z", "len(levels)");
  torch_glue::check_same_device(scales, z, kOp, "scales", "z");
  FL_CHECK_TYPE(scales.is_floating_point(), kOp, "scales must be a floating tensor, got ",
                torch_glue::python_dtype(scales.scalar_type()));
  FL_CHECK_VALUE(scales.dim() == 2 && scales.size(1) == d && scales.size(0) >= 1 &&
                     scales.size(0) <= kResidualFsqMaxLayers,
                 kOp, "scales must be [num_quantizers, len(levels)] with 1 <= num_quantizers <= ",
                 kResidualFsqMaxLayers, " and len(levels) = ", d, ", got shape ", scales.sizes());
  residual_fsq_make_constants(levels.data(), d, static_cast<int>(scales.size(0)), p);
  p.rows = z.numel() / d;
  const at::ScalarType math = p.dtype == DType::kFloat64 ? at::kDouble : at::kFloat;
  return {p, scales.to(math).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& z, int num_quantizers) {
  at::Tensor z_hat = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  std::vector<int64_t> index_shape(z.sizes().begin(), z.sizes().end() - 1);
  index_shape.push_back(num_quantizers);
  at::Tensor indices = at::empty(index_shape, z.options().dtype(at::kLong));
  at::Tensor pass_count = at::empty(z.sizes(), z.options().dtype(at::kByte));
  return {z_hat, indices, pass_count};
}

ResidualFsqArgs make_args(const at::Tensor& zc, const at::Tensor& scales, at::Tensor& z_hat,
                          at::Tensor& indices, at::Tensor& pass_count) {
  ResidualFsqArgs args;
  args.z = zc.data_ptr();
  args.scales = scales.data_ptr();
  args.z_hat = z_hat.data_ptr();
  args.indices = indices.data_ptr<int64_t>();
  args.pass_count = pass_count.data_ptr<uint8_t>();
  return args;
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // z_hat, indices, pass_count

Outputs residual_fsq_cpu(const at::Tensor& z, const at::Tensor& scales, c10::IntArrayRef levels) {
  auto [p, scales_m] = check_args(z, scales, levels);
  const at::Tensor zc = z.contiguous();
  auto [z_hat, indices, pass_count] = allocate_outputs(z, p.num_quantizers);
  torch_glue::check_status(run_residual_fsq_cpu(p, make_args(zc, scales_m, z_hat, indices, pass_count)));
  return {z_hat, indices, pass_count};
}

#ifdef FL_WITH_CUDA
Outputs residual_fsq_cuda(const at::Tensor& z, const at::Tensor& scales, c10::IntArrayRef levels) {
  auto [p, scales_m] = check_args(z, scales, levels);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous();
  auto [z_hat, indices, pass_count] = allocate_outputs(z, p.num_quantizers);
  C10_CUDA_CHECK(launch_residual_fsq_cuda(p, make_args(zc, scales_m, z_hat, indices, pass_count),
                                          c10::cuda::getCurrentCUDAStream()));
  return {z_hat, indices, pass_count};
}
#endif

}  // namespace
}  // namespace fastlatent

TORCH_LIBRARY_FRAGMENT(fastlatent, m) {
  m.def("residual_fsq(Tensor z, Tensor scales, int[] levels) -> "
        "(Tensor z_hat, Tensor indices, Tensor pass_count)");
}

TORCH_LIBRARY_IMPL(fastlatent, CPU, m) { m.impl("residual_fsq", &fastlatent::residual_fsq_cpu); }

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) {
  FL_REGISTER_CUDA(m, "residual_fsq", &fastlatent::residual_fsq_cuda);
}
