// Binding for group_norm_conv3x3: conv3x3(act(group_norm(x))) + bias + residual (see group_norm_conv.h).
//
// Two algorithms compute it:
//   "fused"   (CUDA, fp16/bf16, compute capability >= 8.0): group_norm_stats, then the implicit-GEMM
//             convolution that normalises and activates its input while loading it; the normalised
//             activation never reaches memory.
//   "unfused" (every device and dtype): the fused group_norm kernel, then at::conv2d (cuDNN /
//             oneDNN), then the residual added in place.
// "auto" takes "fused" where it applies and "unfused" elsewhere. Which of the two is faster for a
// given shape on a given GPU is measured by the benchmark suite (bench_norms.py) and, at run time, by
// fastlatent.nn's "auto" fused-conv mode.
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "group_norm_conv.h"

#ifdef FL_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastlatent {
namespace {

constexpr const char* kOp = "group_norm_conv3x3";

enum class Algorithm { kAuto, kFused, kUnfused };

Algorithm parse_algorithm(std::string_view name) {
  if (name == "auto") return Algorithm::kAuto;
  if (name == "fused") return Algorithm::kFused;
  if (name == "unfused") return Algorithm::kUnfused;
  TORCH_CHECK_VALUE(false, "fastlatent.", kOp, ": algorithm must be \"auto\", \"fused\" or \"unfused\", got \"",
                    std::string(name), "\"");
}

struct Args {
  const at::Tensor& x;
  const std::optional<at::Tensor>& gn_weight;
  const std::optional<at::Tensor>& gn_bias;
  int64_t groups;
  double eps;
  std::string_view activation;
  const at::Tensor& conv_weight;
  const std::optional<at::Tensor>& conv_bias;
  const std::optional<at::Tensor>& residual;
};

// Every argument as the fused and unfused paths both need it; messages as the Python fake's.
void check_args(const Args& a) {
  const at::Tensor& x = a.x;
  FL_CHECK_VALUE(x.dim() == 4, kOp, "x must be 4-D [N, C_in, H, W], got shape ", x.sizes());
  const int64_t cin = x.size(1);
  FL_CHECK_VALUE(cin >= 1, kOp, "x must have C_in >= 1 channels, got shape ", x.sizes());
  FL_CHECK_VALUE(a.groups >= 1 && cin % a.groups == 0, kOp, "groups must be >= 1 and divide the ", cin,
                 " channels of x, got groups=", a.groups);
  FL_CHECK_VALUE(a.eps >= 0.0, kOp, "eps must be >= 0, got ", a.eps);
  torch_glue::kernel_dtype(x, kOp, "x", /*allow_double=*/x.is_cpu());
  torch_glue::parse_activation(a.activation, kOp);
  torch_glue::check_floating_vector(a.gn_weight, x, cin, kOp, "gn_weight", "C_in");
  torch_glue::check_floating_vector(a.gn_bias, x, cin, kOp, "gn_bias", "C_in");
  const at::Tensor& w = a.conv_weight;
  torch_glue::check_same_device(x, w, kOp, "x", "conv_weight");
  FL_CHECK_VALUE(w.dim() == 4 && w.size(0) >= 1 && w.size(1) == cin && w.size(2) == 3 && w.size(3) == 3, kOp,
                 "conv_weight must be [C_out, C_in, 3, 3] with C_in = ", cin, ", got shape ", w.sizes());
  torch_glue::check_same_dtype(x, w, kOp, "x", "conv_weight");
  const int64_t cout = w.size(0);
  if (a.conv_bias.has_value()) {
    torch_glue::check_floating_vector(a.conv_bias, x, cout, kOp, "conv_bias", "C_out");
    torch_glue::check_same_dtype(x, *a.conv_bias, kOp, "x", "conv_bias");
  }
  if (a.residual.has_value()) {
    const at::Tensor& r = *a.residual;
    torch_glue::check_same_device(x, r, kOp, "x", "residual");
    FL_CHECK_VALUE(r.dim() == 4 && r.size(0) == x.size(0) && r.size(1) == cout && r.size(2) == x.size(2) &&
                       r.size(3) == x.size(3),
                   kOp, "residual must be [N, C_out, H, W] = [", x.size(0), ", ", cout, ", ", x.size(2), ", ",
                   x.size(3), "], got shape ", r.sizes());
    torch_glue::check_same_dtype(x, r, kOp, "x", "residual");
  }
}

bool channels_last(const at::Tensor& x) { return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast); }

at::Tensor empty_output(const Args& a) {
  const at::Tensor& x = a.x;
  return at::empty({x.size(0), a.conv_weight.size(0), x.size(2), x.size(3)},
                   x.options().memory_format(channels_last(x) ? at::MemoryFormat::ChannelsLast
                                                              : at::MemoryFormat::Contiguous));
}

using GroupNormFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, double,
    std::string_view, const std::optional<at::Tensor>&);
using GroupNormStatsFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t);

// group_norm kernel, then the library convolution, then the residual in place.
at::Tensor unfused(const Args& a) {
  static const auto group_norm =
      c10::Dispatcher::singleton().findSchemaOrThrow(FL_OP_NAMESPACE "::group_norm", "").typed<GroupNormFn>();
  const at::Tensor y = std::get<0>(group_norm.call(a.x, a.gn_weight, a.gn_bias, a.groups, a.eps, a.activation,
                                                   std::nullopt));
  at::Tensor out = at::conv2d(y, a.conv_weight, a.conv_bias, {1, 1}, {1, 1});
  if (a.residual.has_value()) out.add_(*a.residual);
  return out;
}

bool is_empty(const at::Tensor& x) { return x.size(0) == 0 || x.size(2) == 0 || x.size(3) == 0; }

#ifdef FL_WITH_CUDA
// Why the fused kernel cannot run this call, or an empty string when it can.
std::string fused_unsupported_reason(const Args& a) {
  const at::Tensor& x = a.x;
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16)
    return "x must be float16 or bfloat16 (tensor-core kernel), got " + torch_glue::python_dtype(x.scalar_type());
  int major = 0, arch = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index()));
  if (major < 8) return "the GPU must have compute capability 8.0 or newer, got " + std::to_string(major) + ".x";
  C10_CUDA_CHECK(group_norm_conv3x3_cuda_arch(&arch));  // the guard has made x's device current
  if (arch < 80) {
    return "this build's kernel image for the GPU was compiled for compute_" + std::to_string(arch) +
           " (no bf16 WMMA or cp.async); rebuild with 8.0 or newer in TORCH_CUDA_ARCH_LIST";
  }
  if (x.size(1) > kGnConvMaxInChannels) return "C_in must be at most " + std::to_string(kGnConvMaxInChannels);
  if (x.size(0) > 65535) return "N must be at most 65535";
  return "";
}

at::Tensor fp32_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

void copy_strides(int64_t (&dst)[4], const at::Tensor& t) {
  for (int d = 0; d < 4; ++d) dst[d] = t.stride(d);
}

// packed[chunk][tap][k][co] = W[co, chunk * 32 + k, r, s], zero-padded (see group_norm_conv.h), written
// by one kernel on the stream into an uninitialised workspace from the caching allocator. Packed on
// every call, never cached: users may change the weights in place.
at::Tensor pack_weight(const at::Tensor& w, cudaStream_t stream) {
  at::Tensor packed = at::empty({gn_conv_packed_weight_elements(w.size(0), w.size(1))}, w.options());
  GnConvWeightPackParams p;
  p.w = w.data_ptr();
  copy_strides(p.w_stride, w);
  p.packed = packed.data_ptr();
  p.cout = w.size(0);
  p.cin = w.size(1);
  p.dtype_bytes = static_cast<int>(w.element_size());
  C10_CUDA_CHECK(launch_group_norm_conv3x3_pack_weight_cuda(p, stream));
  return packed;
}

at::Tensor fused(const Args& a) {
  static const auto stats_op =
      c10::Dispatcher::singleton().findSchemaOrThrow(FL_OP_NAMESPACE "::group_norm_stats", "").typed<GroupNormStatsFn>();
  const auto [mean, m2] = stats_op.call(a.x, a.groups);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor packed = pack_weight(a.conv_weight, stream);
  const at::Tensor gn_weight = fp32_or_undefined(a.gn_weight);
  const at::Tensor gn_bias = fp32_or_undefined(a.gn_bias);
  const at::Tensor conv_bias = fp32_or_undefined(a.conv_bias);
  at::Tensor out = empty_output(a);
  GroupNormConvParams p;
  p.x = a.x.data_ptr();
  copy_strides(p.x_stride, a.x);
  p.mean = mean.data_ptr<float>();
  p.m2 = m2.data_ptr<float>();
  p.gn_weight = ptr_or_null<float>(gn_weight);
  p.gn_bias = ptr_or_null<float>(gn_bias);
  p.packed_weight = packed.data_ptr();
  p.conv_bias = ptr_or_null<float>(conv_bias);
  if (a.residual.has_value()) {
    p.residual = a.residual->data_ptr();
    copy_strides(p.residual_stride, *a.residual);
  }
  p.out = out.data_ptr();
  copy_strides(p.out_stride, out);
  p.n = a.x.size(0);
  p.cin = a.x.size(1);
  p.cout = a.conv_weight.size(0);
  p.h = a.x.size(2);
  p.w = a.x.size(3);
  p.groups = a.groups;
  p.eps = static_cast<float>(a.eps);
  p.dtype = torch_glue::kernel_dtype(a.x, kOp, "x");
  p.activation = torch_glue::parse_activation(a.activation, kOp);
  C10_CUDA_CHECK(launch_group_norm_conv3x3_cuda(p, stream));
  return out;
}

#endif

at::Tensor group_norm_conv3x3_cpu(const at::Tensor& x, const std::optional<at::Tensor>& gn_weight,
                                  const std::optional<at::Tensor>& gn_bias, int64_t groups, double eps,
                                  std::string_view activation, const at::Tensor& conv_weight,
                                  const std::optional<at::Tensor>& conv_bias,
                                  const std::optional<at::Tensor>& residual, std::string_view algorithm) {
  const Args a{x, gn_weight, gn_bias, groups, eps, activation, conv_weight, conv_bias, residual};
  check_args(a);
  FL_CHECK_VALUE(parse_algorithm(algorithm) != Algorithm::kFused, kOp, "algorithm=\"fused\" needs a CUDA tensor "
                 "(the CPU runs \"unfused\": the group_norm kernel, then oneDNN's convolution)");
  return is_empty(x) ? empty_output(a) : unfused(a);
}

#ifdef FL_WITH_CUDA
at::Tensor group_norm_conv3x3_cuda(const at::Tensor& x, const std::optional<at::Tensor>& gn_weight,
                                   const std::optional<at::Tensor>& gn_bias, int64_t groups, double eps,
                                   std::string_view activation, const at::Tensor& conv_weight,
                                   const std::optional<at::Tensor>& conv_bias,
                                   const std::optional<at::Tensor>& residual, std::string_view algorithm) {
  const Args a{x, gn_weight, gn_bias, groups, eps, activation, conv_weight, conv_bias, residual};
  check_args(a);
  const Algorithm algo = parse_algorithm(algorithm);
  const c10::cuda::CUDAGuard guard(x.device());
  const std::string why_not = fused_unsupported_reason(a);
  FL_CHECK_VALUE(algo != Algorithm::kFused || why_not.empty(), kOp, "algorithm=\"fused\": ", why_not);
  if (is_empty(x)) return empty_output(a);
  if (algo == Algorithm::kUnfused || !why_not.empty()) return unfused(a);
  return fused(a);
}
#endif

}  // namespace
}  // namespace fastlatent

TORCH_LIBRARY_FRAGMENT(fastlatent, m) {
  m.def("group_norm_conv3x3(Tensor x, Tensor? gn_weight, Tensor? gn_bias, int groups, float eps, str activation, "
        "Tensor conv_weight, Tensor? conv_bias=None, Tensor? residual=None, str algorithm=\"auto\") -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlatent, CPU, m) { m.impl("group_norm_conv3x3", &fastlatent::group_norm_conv3x3_cpu); }

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) {
  FL_REGISTER_CUDA(m, "group_norm_conv3x3", &fastlatent::group_norm_conv3x3_cuda);
}
