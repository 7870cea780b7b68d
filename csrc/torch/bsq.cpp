// Bindings for BSQ: bsq_quantize, bsq_quantize_backward, bsq_entropy, bsq_entropy_backward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "bsq.h"
#include "checks.h"

#ifdef FL_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastlatent {
namespace {

BsqParams base_params(const at::Tensor& z, const char* op, bool cuda) {
  BsqParams p;
  p.dtype = torch_glue::kernel_dtype(z, op, "z", /*allow_double=*/!cuda);
  p.d = torch_glue::check_channels(z, kBsqMaxDims, op, "z", "bits per code, for int64 indices");
  p.n = z.numel() / p.d;
  return p;
}

at::Tensor like(const at::Tensor& z) {
  return at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
}

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor> bsq_quantize_impl(const at::Tensor& z) {
  constexpr const char* kOp = "bsq_quantize";
  BsqParams p = base_params(z, kOp, kCuda);
  const at::Tensor zc = z.contiguous();
  at::Tensor quantized = like(z);
  at::Tensor indices = at::empty(z.sizes().slice(0, z.dim() - 1), z.options().dtype(at::kLong));
  p.z = zc.data_ptr();
  p.quantized = quantized.data_ptr();
  p.indices = indices.data_ptr<int64_t>();
  if constexpr (kCuda) {
#ifdef FL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(z.device());
    C10_CUDA_CHECK(launch_bsq_quantize_cuda(p, c10::cuda::getCurrentCUDAStream()));
#endif
  } else {
    torch_glue::check_status(run_bsq_quantize_cpu(p));
  }
  return {quantized, indices};
}

template <bool kCuda>
at::Tensor bsq_quantize_backward_impl(const at::Tensor& grad_quantized, const at::Tensor& z) {
  constexpr const char* kOp = "bsq_quantize_backward";
  BsqParams p = base_params(z, kOp, kCuda);
  torch_glue::check_tensor_like(grad_quantized, z.sizes(), z.scalar_type(), z, kOp, "grad_quantized");
  const at::Tensor zc = z.contiguous(), gc = grad_quantized.contiguous();
  at::Tensor grad_z = like(z);
  p.z = zc.data_ptr();
  p.grad_quantized = gc.data_ptr();
  p.grad_z = grad_z.data_ptr();
  if constexpr (kCuda) {
#ifdef FL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(z.device());
    C10_CUDA_CHECK(launch_bsq_quantize_backward_cuda(p, c10::cuda::getCurrentCUDAStream()));
#endif
  } else {
    torch_glue::check_status(run_bsq_quantize_backward_cpu(p));
  }
  return grad_z;
}

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor> bsq_entropy_impl(const at::Tensor& z, double inv_temperature) {
  constexpr const char* kOp = "bsq_entropy";
  BsqParams p = base_params(z, kOp, kCuda);
  torch_glue::check_positive(inv_temperature, kOp, "inv_temperature");
  p.logit_scale = 4.0 * inv_temperature / std::sqrt(static_cast<double>(p.d));
  const at::Tensor zc = z.contiguous();
  const auto out_options = z.options().dtype(torch_glue::math_scalar_type(z));
  at::Tensor per_sample = at::empty(z.sizes().slice(0, z.dim() - 1), out_options);
  at::Tensor avg_probs = at::empty({p.d}, out_options);
  p.z = zc.data_ptr();
  p.per_sample_entropy = per_sample.data_ptr();
  p.avg_probs = avg_probs.data_ptr();
  if constexpr (kCuda) {
#ifdef FL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(z.device());
    const at::Tensor workspace = at::empty({static_cast<int64_t>(bsq_entropy_cuda_workspace_bytes(p.n, p.d)) + 16},
                                           z.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    C10_CUDA_CHECK(launch_bsq_entropy_cuda(p, c10::cuda::getCurrentCUDAStream()));
#endif
  } else {
    torch_glue::check_status(run_bsq_entropy_cpu(p));
  }
  return {per_sample, avg_probs};
}

template <bool kCuda>
at::Tensor bsq_entropy_backward_impl(const at::Tensor& grad_per_sample, const at::Tensor& grad_avg_probs,
                                     const at::Tensor& z, double inv_temperature) {
  constexpr const char* kOp = "bsq_entropy_backward";
  BsqParams p = base_params(z, kOp, kCuda);
  torch_glue::check_positive(inv_temperature, kOp, "inv_temperature");
  p.logit_scale = 4.0 * inv_temperature / std::sqrt(static_cast<double>(p.d));
  const at::ScalarType out_type = torch_glue::math_scalar_type(z);
  torch_glue::check_tensor_like(grad_per_sample, z.sizes().slice(0, z.dim() - 1), out_type, z, kOp,
                                "grad_per_sample_entropy");
  torch_glue::check_tensor_like(grad_avg_probs, {z.size(-1)}, out_type, z, kOp, "grad_avg_probs");
  const at::Tensor zc = z.contiguous(), gps = grad_per_sample.contiguous(), gavg = grad_avg_probs.contiguous();
  at::Tensor grad_z = like(z);
  p.z = zc.data_ptr();
  p.grad_per_sample = gps.data_ptr();
  p.grad_avg_probs = gavg.data_ptr();
  p.grad_z = grad_z.data_ptr();
  if constexpr (kCuda) {
#ifdef FL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(z.device());
    C10_CUDA_CHECK(launch_bsq_entropy_backward_cuda(p, c10::cuda::getCurrentCUDAStream()));
#endif
  } else {
    torch_glue::check_status(run_bsq_entropy_backward_cpu(p));
  }
  return grad_z;
}

}  // namespace
}  // namespace fastlatent

TORCH_LIBRARY_FRAGMENT(fastlatent, m) {
  m.def("bsq_quantize(Tensor z) -> (Tensor quantized, Tensor indices)");
  m.def("bsq_quantize_backward(Tensor grad_quantized, Tensor z) -> Tensor");
  m.def("bsq_entropy(Tensor z, float inv_temperature=1.0) -> (Tensor per_sample_entropy, Tensor avg_probs)");
  m.def("bsq_entropy_backward(Tensor grad_per_sample_entropy, Tensor grad_avg_probs, Tensor z, "
        "float inv_temperature=1.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlatent, CPU, m) {
  m.impl("bsq_quantize", &fastlatent::bsq_quantize_impl<false>);
  m.impl("bsq_quantize_backward", &fastlatent::bsq_quantize_backward_impl<false>);
  m.impl("bsq_entropy", &fastlatent::bsq_entropy_impl<false>);
  m.impl("bsq_entropy_backward", &fastlatent::bsq_entropy_backward_impl<false>);
}

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) {
  FL_REGISTER_CUDA(m, "bsq_quantize", &fastlatent::bsq_quantize_impl<true>);
  FL_REGISTER_CUDA(m, "bsq_quantize_backward", &fastlatent::bsq_quantize_backward_impl<true>);
  FL_REGISTER_CUDA(m, "bsq_entropy", &fastlatent::bsq_entropy_impl<true>);
  FL_REGISTER_CUDA(m, "bsq_entropy_backward", &fastlatent::bsq_entropy_backward_impl<true>);
}
