// Bindings for LFQ: lfq_quantize, lfq_entropy, lfq_entropy_backward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "lfq.h"

#ifdef FL_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastlatent {
namespace {

using torch_glue::check_positive;

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor> lfq_quantize_impl(const at::Tensor& x, double codebook_scale) {
  constexpr const char* kOp = "lfq_quantize";
  LfqQuantizeParams p;
  p.dtype = torch_glue::kernel_dtype(x, kOp, "x", /*allow_double=*/!kCuda);
  p.d = torch_glue::check_channels(x, kLfqMaxQuantizeDims, kOp, "x", "bits per code, for int64 indices");
  check_positive(codebook_scale, kOp, "codebook_scale");
  p.n = x.numel() / p.d;
  p.codebook_scale = codebook_scale;
  const at::Tensor xc = x.contiguous();
  at::Tensor quantized = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor indices = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  p.x = xc.data_ptr();
  p.quantized = quantized.data_ptr();
  p.indices = indices.data_ptr<int64_t>();
  if constexpr (kCuda) {
#ifdef FL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    C10_CUDA_CHECK(launch_lfq_quantize_cuda(p, c10::cuda::getCurrentCUDAStream()));
#endif
  } else {
    torch_glue::check_status(run_lfq_quantize_cpu(p));
  }
  return {quantized, indices};
}

LfqEntropyParams entropy_params(const at::Tensor& x, double codebook_scale, double inv_temperature, const char* op,
                                bool cuda) {
  LfqEntropyParams p;
  p.dtype = torch_glue::kernel_dtype(x, op, "x", /*allow_double=*/!cuda);
  p.d = torch_glue::check_channels(x, kLfqMaxEntropyDims, op, "x", "bits per code; the loss keeps 2^d probabilities");
  check_positive(codebook_scale, op, "codebook_scale");
  check_positive(inv_temperature, op, "inv_temperature");
  p.n = x.numel() / p.d;
  p.logit_scale = 4.0 * codebook_scale * inv_temperature;
  return p;
}

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor> lfq_entropy_impl(const at::Tensor& x, double codebook_scale,
                                                    double inv_temperature) {
  constexpr const char* kOp = "lfq_entropy";
  LfqEntropyParams p = entropy_params(x, codebook_scale, inv_temperature, kOp, kCuda);
  const at::Tensor xc = x.contiguous();
  const auto out_options = x.options().dtype(torch_glue::math_scalar_type(x));
  at::Tensor per_sample = at::empty(x.sizes().slice(0, x.dim() - 1), out_options);
  at::Tensor avg_probs = at::empty({int64_t{1} << p.d}, out_options);
  p.x = xc.data_ptr();
  p.per_sample_entropy = per_sample.data_ptr();
  p.avg_probs = avg_probs.data_ptr();
  if constexpr (kCuda) {
#ifdef FL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const at::Tensor workspace = at::empty(
        {static_cast<int64_t>(lfq_entropy_cuda_workspace_bytes(p.n, p.d, false))}, x.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    C10_CUDA_CHECK(launch_lfq_entropy_cuda(p, c10::cuda::getCurrentCUDAStream()));
#endif
  } else {
    torch_glue::check_status(run_lfq_entropy_cpu(p));
  }
  return {per_sample, avg_probs};
}

template <bool kCuda>
at::Tensor lfq_entropy_backward_impl(const at::Tensor& grad_per_sample, const at::Tensor& grad_avg_probs,
                                     const at::Tensor& x, double codebook_scale, double inv_temperature) {
  constexpr const char* kOp = "lfq_entropy_backward";
  LfqEntropyParams p = entropy_params(x, codebook_scale, inv_temperature, kOp, kCuda);
  const at::ScalarType out_type = torch_glue::math_scalar_type(x);
  torch_glue::check_tensor_like(grad_per_sample, x.sizes().slice(0, x.dim() - 1), out_type, x, kOp,
                                "grad_per_sample_entropy");
  const int64_t codes = int64_t{1} << p.d;
  torch_glue::check_tensor_like(grad_avg_probs, {codes}, out_type, x, kOp, "grad_avg_probs");
  const at::Tensor xc = x.contiguous(), gps = grad_per_sample.contiguous(), gavg = grad_avg_probs.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  p.x = xc.data_ptr();
  p.grad_per_sample = gps.data_ptr();
  p.grad_avg_probs = gavg.data_ptr();
  p.grad_x = grad_x.data_ptr();
  if constexpr (kCuda) {
#ifdef FL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const at::Tensor workspace = at::empty(
        {static_cast<int64_t>(lfq_entropy_cuda_workspace_bytes(p.n, p.d, true))}, x.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    C10_CUDA_CHECK(launch_lfq_entropy_backward_cuda(p, c10::cuda::getCurrentCUDAStream()));
#endif
  } else {
    torch_glue::check_status(run_lfq_entropy_backward_cpu(p));
  }
  return grad_x;
}

}  // namespace
}  // namespace fastlatent

TORCH_LIBRARY_FRAGMENT(fastlatent, m) {
  m.def("lfq_quantize(Tensor x, float codebook_scale=1.0) -> (Tensor quantized, Tensor indices)");
  m.def("lfq_entropy(Tensor x, float codebook_scale=1.0, float inv_temperature=100.0) "
        "-> (Tensor per_sample_entropy, Tensor avg_probs)");
  m.def("lfq_entropy_backward(Tensor grad_per_sample_entropy, Tensor grad_avg_probs, Tensor x, "
        "float codebook_scale=1.0, float inv_temperature=100.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlatent, CPU, m) {
  m.impl("lfq_quantize", &fastlatent::lfq_quantize_impl<false>);
  m.impl("lfq_entropy", &fastlatent::lfq_entropy_impl<false>);
  m.impl("lfq_entropy_backward", &fastlatent::lfq_entropy_backward_impl<false>);
}

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) {
  FL_REGISTER_CUDA(m, "lfq_quantize", &fastlatent::lfq_quantize_impl<true>);
  FL_REGISTER_CUDA(m, "lfq_entropy", &fastlatent::lfq_entropy_impl<true>);
  FL_REGISTER_CUDA(m, "lfq_entropy_backward", &fastlatent::lfq_entropy_backward_impl<true>);
}
