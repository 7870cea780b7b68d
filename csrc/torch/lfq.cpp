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

// Each call's checked params and the tensors they point into (kept alive while the kernel runs).
struct QuantizeCall {
  LfqQuantizeParams p;
  at::Tensor xc, quantized, indices;
};

QuantizeCall prepare_quantize(const at::Tensor& x, double codebook_scale, bool cuda) {
  constexpr const char* kOp = "lfq_quantize";
  QuantizeCall c;
  c.p.dtype = torch_glue::kernel_dtype(x, kOp, "x", /*allow_double=*/!cuda);
  c.p.d = torch_glue::check_channels(x, kLfqMaxQuantizeDims, kOp, "x", "bits per code, for int64 indices");
  check_positive(codebook_scale, kOp, "codebook_scale");
  c.p.n = x.numel() / c.p.d;
  c.p.codebook_scale = codebook_scale;
  c.xc = x.contiguous();
  c.quantized = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  c.indices = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  c.p.x = c.xc.data_ptr();
  c.p.quantized = c.quantized.data_ptr();
  c.p.indices = c.indices.data_ptr<int64_t>();
  return c;
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

struct EntropyCall {
  LfqEntropyParams p;
  at::Tensor xc, per_sample, avg_probs;
};

EntropyCall prepare_entropy(const at::Tensor& x, double codebook_scale, double inv_temperature, bool cuda) {
  EntropyCall c;
  c.p = entropy_params(x, codebook_scale, inv_temperature, "lfq_entropy", cuda);
  c.xc = x.contiguous();
  const auto out_options = x.options().dtype(torch_glue::math_scalar_type(x));
  c.per_sample = at::empty(x.sizes().slice(0, x.dim() - 1), out_options);
  c.avg_probs = at::empty({int64_t{1} << c.p.d}, out_options);
  c.p.x = c.xc.data_ptr();
  c.p.per_sample_entropy = c.per_sample.data_ptr();
  c.p.avg_probs = c.avg_probs.data_ptr();
  return c;
}

struct EntropyBackwardCall {
  LfqEntropyParams p;
  at::Tensor xc, gps, gavg, grad_x;
};

EntropyBackwardCall prepare_entropy_backward(const at::Tensor& grad_per_sample, const at::Tensor& grad_avg_probs,
                                             const at::Tensor& x, double codebook_scale, double inv_temperature,
                                             bool cuda) {
  constexpr const char* kOp = "lfq_entropy_backward";
  EntropyBackwardCall c;
  c.p = entropy_params(x, codebook_scale, inv_temperature, kOp, cuda);
  const at::ScalarType out_type = torch_glue::math_scalar_type(x);
  torch_glue::check_tensor_like(grad_per_sample, x.sizes().slice(0, x.dim() - 1), out_type, x, kOp,
                                "grad_per_sample_entropy");
  const int64_t codes = int64_t{1} << c.p.d;
  torch_glue::check_tensor_like(grad_avg_probs, {codes}, out_type, x, kOp, "grad_avg_probs");
  c.xc = x.contiguous();
  c.gps = grad_per_sample.contiguous();
  c.gavg = grad_avg_probs.contiguous();
  c.grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  c.p.x = c.xc.data_ptr();
  c.p.grad_per_sample = c.gps.data_ptr();
  c.p.grad_avg_probs = c.gavg.data_ptr();
  c.p.grad_x = c.grad_x.data_ptr();
  return c;
}

std::tuple<at::Tensor, at::Tensor> lfq_quantize_cpu(const at::Tensor& x, double codebook_scale) {
  const QuantizeCall c = prepare_quantize(x, codebook_scale, /*cuda=*/false);
  torch_glue::check_status(run_lfq_quantize_cpu(c.p));
  return {c.quantized, c.indices};
}

std::tuple<at::Tensor, at::Tensor> lfq_entropy_cpu(const at::Tensor& x, double codebook_scale,
                                                   double inv_temperature) {
  const EntropyCall c = prepare_entropy(x, codebook_scale, inv_temperature, /*cuda=*/false);
  torch_glue::check_status(run_lfq_entropy_cpu(c.p));
  return {c.per_sample, c.avg_probs};
}

at::Tensor lfq_entropy_backward_cpu(const at::Tensor& grad_per_sample, const at::Tensor& grad_avg_probs,
                                    const at::Tensor& x, double codebook_scale, double inv_temperature) {
  const EntropyBackwardCall c =
      prepare_entropy_backward(grad_per_sample, grad_avg_probs, x, codebook_scale, inv_temperature, /*cuda=*/false);
  torch_glue::check_status(run_lfq_entropy_backward_cpu(c.p));
  return c.grad_x;
}

#ifdef FL_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> lfq_quantize_cuda(const at::Tensor& x, double codebook_scale) {
  const QuantizeCall c = prepare_quantize(x, codebook_scale, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(launch_lfq_quantize_cuda(c.p, c10::cuda::getCurrentCUDAStream()));
  return {c.quantized, c.indices};
}

std::tuple<at::Tensor, at::Tensor> lfq_entropy_cuda(const at::Tensor& x, double codebook_scale,
                                                    double inv_temperature) {
  EntropyCall c = prepare_entropy(x, codebook_scale, inv_temperature, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor workspace = at::empty({static_cast<int64_t>(lfq_entropy_cuda_workspace_bytes(c.p.n, c.p.d, false))},
                                         x.options().dtype(at::kByte));
  c.p.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(launch_lfq_entropy_cuda(c.p, c10::cuda::getCurrentCUDAStream()));
  return {c.per_sample, c.avg_probs};
}

at::Tensor lfq_entropy_backward_cuda(const at::Tensor& grad_per_sample, const at::Tensor& grad_avg_probs,
                                     const at::Tensor& x, double codebook_scale, double inv_temperature) {
  EntropyBackwardCall c =
      prepare_entropy_backward(grad_per_sample, grad_avg_probs, x, codebook_scale, inv_temperature, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor workspace = at::empty({static_cast<int64_t>(lfq_entropy_cuda_workspace_bytes(c.p.n, c.p.d, true))},
                                         x.options().dtype(at::kByte));
  c.p.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(launch_lfq_entropy_backward_cuda(c.p, c10::cuda::getCurrentCUDAStream()));
  return c.grad_x;
}
#endif

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
  m.impl("lfq_quantize", &fastlatent::lfq_quantize_cpu);
  m.impl("lfq_entropy", &fastlatent::lfq_entropy_cpu);
  m.impl("lfq_entropy_backward", &fastlatent::lfq_entropy_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) {
  FL_REGISTER_CUDA(m, "lfq_quantize", &fastlatent::lfq_quantize_cuda);
  FL_REGISTER_CUDA(m, "lfq_entropy", &fastlatent::lfq_entropy_cuda);
  FL_REGISTER_CUDA(m, "lfq_entropy_backward", &fastlatent::lfq_entropy_backward_cuda);
}
