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

// Each call's checked params and the tensors they point into (kept alive while the kernel runs).
struct QuantizeCall {
  BsqParams p;
  at::Tensor zc, quantized, indices;
};

QuantizeCall prepare_quantize(const at::Tensor& z, bool cuda) {
  QuantizeCall c;
  c.p = base_params(z, "bsq_quantize", cuda);
  c.zc = z.contiguous();
  c.quantized = like(z);
  c.indices = at::empty(z.sizes().slice(0, z.dim() - 1), z.options().dtype(at::kLong));
  c.p.z = c.zc.data_ptr();
  c.p.quantized = c.quantized.data_ptr();
  c.p.indices = c.indices.data_ptr<int64_t>();
  return c;
}

struct QuantizeBackwardCall {
  BsqParams p;
  at::Tensor zc, gc, grad_z;
};

QuantizeBackwardCall prepare_quantize_backward(const at::Tensor& grad_quantized, const at::Tensor& z, bool cuda) {
  constexpr const char* kOp = "bsq_quantize_backward";
  QuantizeBackwardCall c;
  c.p = base_params(z, kOp, cuda);
  torch_glue::check_tensor_like(grad_quantized, z.sizes(), z.scalar_type(), z, kOp, "grad_quantized");
  c.zc = z.contiguous();
  c.gc = grad_quantized.contiguous();
  c.grad_z = like(z);
  c.p.z = c.zc.data_ptr();
  c.p.grad_quantized = c.gc.data_ptr();
  c.p.grad_z = c.grad_z.data_ptr();
  return c;
}

BsqParams entropy_params(const at::Tensor& z, double inv_temperature, const char* op, bool cuda) {
  BsqParams p = base_params(z, op, cuda);
  torch_glue::check_positive(inv_temperature, op, "inv_temperature");
  p.logit_scale = 4.0 * inv_temperature / std::sqrt(static_cast<double>(p.d));
  return p;
}

struct EntropyCall {
  BsqParams p;
  at::Tensor zc, per_sample, avg_probs;
};

EntropyCall prepare_entropy(const at::Tensor& z, double inv_temperature, bool cuda) {
  EntropyCall c;
  c.p = entropy_params(z, inv_temperature, "bsq_entropy", cuda);
  c.zc = z.contiguous();
  const auto out_options = z.options().dtype(torch_glue::math_scalar_type(z));
  c.per_sample = at::empty(z.sizes().slice(0, z.dim() - 1), out_options);
  c.avg_probs = at::empty({c.p.d}, out_options);
  c.p.z = c.zc.data_ptr();
  c.p.per_sample_entropy = c.per_sample.data_ptr();
  c.p.avg_probs = c.avg_probs.data_ptr();
  return c;
}

struct EntropyBackwardCall {
  BsqParams p;
  at::Tensor zc, gps, gavg, grad_z;
};

EntropyBackwardCall prepare_entropy_backward(const at::Tensor& grad_per_sample, const at::Tensor& grad_avg_probs,
                                             const at::Tensor& z, double inv_temperature, bool cuda) {
  constexpr const char* kOp = "bsq_entropy_backward";
  EntropyBackwardCall c;
  c.p = entropy_params(z, inv_temperature, kOp, cuda);
  const at::ScalarType out_type = torch_glue::math_scalar_type(z);
  torch_glue::check_tensor_like(grad_per_sample, z.sizes().slice(0, z.dim() - 1), out_type, z, kOp,
                                "grad_per_sample_entropy");
  torch_glue::check_tensor_like(grad_avg_probs, {z.size(-1)}, out_type, z, kOp, "grad_avg_probs");
  c.zc = z.contiguous();
  c.gps = grad_per_sample.contiguous();
  c.gavg = grad_avg_probs.contiguous();
  c.grad_z = like(z);
  c.p.z = c.zc.data_ptr();
  c.p.grad_per_sample = c.gps.data_ptr();
  c.p.grad_avg_probs = c.gavg.data_ptr();
  c.p.grad_z = c.grad_z.data_ptr();
  return c;
}

std::tuple<at::Tensor, at::Tensor> bsq_quantize_cpu(const at::Tensor& z) {
  const QuantizeCall c = prepare_quantize(z, /*cuda=*/false);
  torch_glue::check_status(run_bsq_quantize_cpu(c.p));
  return {c.quantized, c.indices};
}

at::Tensor bsq_quantize_backward_cpu(const at::Tensor& grad_quantized, const at::Tensor& z) {
  const QuantizeBackwardCall c = prepare_quantize_backward(grad_quantized, z, /*cuda=*/false);
  torch_glue::check_status(run_bsq_quantize_backward_cpu(c.p));
  return c.grad_z;
}

std::tuple<at::Tensor, at::Tensor> bsq_entropy_cpu(const at::Tensor& z, double inv_temperature) {
  const EntropyCall c = prepare_entropy(z, inv_temperature, /*cuda=*/false);
  torch_glue::check_status(run_bsq_entropy_cpu(c.p));
  return {c.per_sample, c.avg_probs};
}

at::Tensor bsq_entropy_backward_cpu(const at::Tensor& grad_per_sample, const at::Tensor& grad_avg_probs,
                                    const at::Tensor& z, double inv_temperature) {
  const EntropyBackwardCall c =
      prepare_entropy_backward(grad_per_sample, grad_avg_probs, z, inv_temperature, /*cuda=*/false);
  torch_glue::check_status(run_bsq_entropy_backward_cpu(c.p));
  return c.grad_z;
}

#ifdef FL_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> bsq_quantize_cuda(const at::Tensor& z) {
  const QuantizeCall c = prepare_quantize(z, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(z.device());
  C10_CUDA_CHECK(launch_bsq_quantize_cuda(c.p, c10::cuda::getCurrentCUDAStream()));
  return {c.quantized, c.indices};
}

at::Tensor bsq_quantize_backward_cuda(const at::Tensor& grad_quantized, const at::Tensor& z) {
  const QuantizeBackwardCall c = prepare_quantize_backward(grad_quantized, z, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(z.device());
  C10_CUDA_CHECK(launch_bsq_quantize_backward_cuda(c.p, c10::cuda::getCurrentCUDAStream()));
  return c.grad_z;
}

std::tuple<at::Tensor, at::Tensor> bsq_entropy_cuda(const at::Tensor& z, double inv_temperature) {
  EntropyCall c = prepare_entropy(z, inv_temperature, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor workspace = at::empty({static_cast<int64_t>(bsq_entropy_cuda_workspace_bytes(c.p.n, c.p.d)) + 16},
                                         z.options().dtype(at::kByte));
  c.p.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(launch_bsq_entropy_cuda(c.p, c10::cuda::getCurrentCUDAStream()));
  return {c.per_sample, c.avg_probs};
}

at::Tensor bsq_entropy_backward_cuda(const at::Tensor& grad_per_sample, const at::Tensor& grad_avg_probs,
                                     const at::Tensor& z, double inv_temperature) {
  const EntropyBackwardCall c =
      prepare_entropy_backward(grad_per_sample, grad_avg_probs, z, inv_temperature, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(z.device());
  C10_CUDA_CHECK(launch_bsq_entropy_backward_cuda(c.p, c10::cuda::getCurrentCUDAStream()));
  return c.grad_z;
}
#endif

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
  m.impl("bsq_quantize", &fastlatent::bsq_quantize_cpu);
  m.impl("bsq_quantize_backward", &fastlatent::bsq_quantize_backward_cpu);
  m.impl("bsq_entropy", &fastlatent::bsq_entropy_cpu);
  m.impl("bsq_entropy_backward", &fastlatent::bsq_entropy_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) {
  FL_REGISTER_CUDA(m, "bsq_quantize", &fastlatent::bsq_quantize_cuda);
  FL_REGISTER_CUDA(m, "bsq_quantize_backward", &fastlatent::bsq_quantize_backward_cuda);
  FL_REGISTER_CUDA(m, "bsq_entropy", &fastlatent::bsq_entropy_cuda);
  FL_REGISTER_CUDA(m, "bsq_entropy_backward", &fastlatent::bsq_entropy_backward_cuda);
}
