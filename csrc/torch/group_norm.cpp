// Binding for group_norm, group_norm_backward and the two halves of the forward,
// group_norm_stats and group_norm_apply.
//
// Layout: x is [N, C, *spatial]. When its strides are channels-last (C innermost, the
// memory_format=channels_last family, any spatial rank) the kernels read it in place and the
// outputs are channels-last too; otherwise x is made contiguous (channels-first).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "group_norm.h"

#ifdef FL_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastlatent {
namespace {

constexpr const char* kOp = "group_norm";

bool is_channels_last(const at::Tensor& x) {
  if (x.dim() < 3 || x.is_contiguous()) return false;
  return x.movedim(1, -1).is_contiguous();
}

// The buffer the kernels read: [N, C, S] or [N, S, C] contiguous, as a tensor that shares x's
// storage when possible.
at::Tensor canonical(const at::Tensor& t, Layout layout) {
  return layout == Layout::kChannelsLast ? t.movedim(1, -1).contiguous() : t.contiguous();
}

// Output of x's shape in the given layout.
at::Tensor empty_in_layout(const at::Tensor& x, Layout layout) {
  if (layout == Layout::kChannelsFirst) return at::empty(x.sizes(), x.options());
  return at::empty(x.movedim(1, -1).sizes(), x.options()).movedim(-1, 1);
}

struct Shape {
  int64_t n, c, s;
  Layout layout;
  DType dtype;
};

Shape check_input(const at::Tensor& x, int64_t groups, bool allow_double, const char* op = kOp) {
  FL_CHECK_VALUE(x.dim() >= 2, op, "x must be [N, C, *spatial] (at least 2-D), got shape ", x.sizes());
  const int64_t c = x.size(1);
  FL_CHECK_VALUE(c >= 1, op, "x must have C >= 1 channels, got shape ", x.sizes());
  FL_CHECK_VALUE(groups >= 1 && c % groups == 0, op, "groups must be >= 1 and divide the ", c,
                 " channels of x, got groups=", groups);
  Shape shape;
  shape.dtype = torch_glue::kernel_dtype(x, op, "x", allow_double);
  shape.n = x.size(0);
  shape.c = c;
  shape.s = 1;
  for (int64_t d = 2; d < x.dim(); ++d) shape.s *= x.size(d);
  shape.layout = is_channels_last(x) ? Layout::kChannelsLast : Layout::kChannelsFirst;
  return shape;
}

// The sizes every group_norm params struct carries.
template <typename Params>
void set_sizes(Params& p, const Shape& shape, int64_t groups) {
  p.n = shape.n;
  p.c = shape.c;
  p.s = shape.s;
  p.groups = groups;
  p.dtype = shape.dtype;
  p.layout = shape.layout;
}

at::Tensor checked_affine(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name,
                          const char* op = kOp) {
  if (!t.has_value()) return at::Tensor();
  torch_glue::check_floating_vector(t, x, x.size(1), op, name, "C");
  // fp32 for the kernels, except that float64 x keeps float64 weights (gradcheck needs them exact).
  return t->to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

struct Forward {
  GroupNormParams params;
  at::Tensor xc, weight, bias, residual, out, mean, rstd;
};

Forward prepare_forward(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, int64_t groups, double eps,
                        std::string_view activation, const std::optional<at::Tensor>& residual, bool allow_double) {
  const Shape shape = check_input(x, groups, allow_double);
  FL_CHECK_VALUE(eps >= 0.0, kOp, "eps must be >= 0, got ", eps);
  Forward f;
  f.weight = checked_affine(weight, x, "weight");
  f.bias = checked_affine(bias, x, "bias");
  if (residual.has_value()) {
    torch_glue::check_same_device(x, *residual, kOp, "x", "residual");
    FL_CHECK_VALUE(residual->sizes() == x.sizes(), kOp, "residual must have the shape of x ", x.sizes(), ", got ",
                   residual->sizes());
    torch_glue::check_same_dtype(x, *residual, kOp, "x", "residual");
    f.residual = canonical(*residual, shape.layout);
  }
  f.xc = canonical(x, shape.layout);
  f.out = empty_in_layout(x, shape.layout);
  const auto stats = x.options().dtype(at::kFloat);
  f.mean = at::empty({shape.n, groups}, stats);
  f.rstd = at::empty({shape.n, groups}, stats);
  GroupNormParams& p = f.params;
  p.x = f.xc.data_ptr();
  p.weight = ptr_or_null(f.weight);
  p.bias = ptr_or_null(f.bias);
  p.residual = f.residual.defined() ? f.residual.data_ptr() : nullptr;
  p.out = f.out.data_ptr();
  p.mean = f.mean.data_ptr<float>();
  p.rstd = f.rstd.data_ptr<float>();
  set_sizes(p, shape, groups);
  p.eps = static_cast<float>(eps);
  p.activation = torch_glue::parse_activation(activation, kOp);
  return f;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, int64_t groups,
                                                              double eps, std::string_view activation,
                                                              const std::optional<at::Tensor>& residual) {
  Forward f = prepare_forward(x, weight, bias, groups, eps, activation, residual, /*allow_double=*/true);
  torch_glue::check_status(run_group_norm_cpu(f.params));
  return {f.out, f.mean, f.rstd};
}

struct Backward {
  GroupNormBackwardParams params;
  at::Tensor xc, dyc, weight, bias, mean, rstd, grad_x, grad_weight, grad_bias;
};

Backward prepare_backward(const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
                          int64_t groups, std::string_view activation, bool allow_double) {
  const Shape shape = check_input(x, groups, allow_double);
  FL_CHECK_VALUE(grad_out.sizes() == x.sizes(), kOp, "grad_out must have the shape of x ", x.sizes(), ", got ",
                 grad_out.sizes());
  torch_glue::check_same_dtype(x, grad_out, kOp, "x", "grad_out");
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, {&rstd, "rstd"}}) {
    torch_glue::check_same_device(x, *t, kOp, "x", name);
    FL_CHECK_VALUE(t->dim() == 2 && t->size(0) == shape.n && t->size(1) == groups, kOp, name, " must be [N, groups] = [",
                   shape.n, ", ", groups, "], got shape ", t->sizes());
    FL_CHECK_TYPE(t->scalar_type() == at::kFloat, kOp, name, " must be torch.float32");
  }
  Backward b;
  b.weight = checked_affine(weight, x, "weight");
  b.bias = checked_affine(bias, x, "bias");
  b.xc = canonical(x, shape.layout);
  b.dyc = canonical(grad_out, shape.layout);
  b.mean = mean.contiguous();
  b.rstd = rstd.contiguous();
  b.grad_x = empty_in_layout(x, shape.layout);
  const auto stats = x.options().dtype(at::kFloat);
  b.grad_weight = at::empty({shape.c}, stats);
  b.grad_bias = at::empty({shape.c}, stats);
  GroupNormBackwardParams& p = b.params;
  p.grad_out = b.dyc.data_ptr();
  p.x = b.xc.data_ptr();
  p.weight = ptr_or_null(b.weight);
  p.bias = ptr_or_null(b.bias);
  p.mean = b.mean.data_ptr<float>();
  p.rstd = b.rstd.data_ptr<float>();
  p.grad_x = b.grad_x.data_ptr();
  p.grad_weight = b.grad_weight.data_ptr<float>();
  p.grad_bias = b.grad_bias.data_ptr<float>();
  set_sizes(p, shape, groups);
  p.activation = torch_glue::parse_activation(activation, kOp);
  return b;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
    std::string_view activation) {
  Backward b = prepare_backward(grad_out, x, weight, bias, mean, rstd, groups, activation, /*allow_double=*/true);
  torch_glue::check_status(run_group_norm_backward_cpu(b.params));
  return {b.grad_x, b.grad_weight, b.grad_bias};
}

// group_norm_stats / group_norm_apply: the forward in two halves (see group_norm.h).
constexpr const char* kStatsOp = "group_norm_stats";
constexpr const char* kApplyOp = "group_norm_apply";

struct Stats {
  GroupNormStatsParams params;
  at::Tensor xc, mean, m2;
};

Stats prepare_stats(const at::Tensor& x, int64_t groups, bool allow_double) {
  const Shape shape = check_input(x, groups, allow_double, kStatsOp);
  Stats st;
  st.xc = canonical(x, shape.layout);
  const auto stats = x.options().dtype(at::kFloat);
  st.mean = at::empty({shape.n, groups}, stats);
  st.m2 = at::empty({shape.n, groups}, stats);
  GroupNormStatsParams& p = st.params;
  p.x = st.xc.data_ptr();
  p.mean = st.mean.data_ptr<float>();
  p.m2 = st.m2.data_ptr<float>();
  set_sizes(p, shape, groups);
  return st;
}

struct Apply {
  GroupNormApplyParams params;
  at::Tensor xc, mean, rstd, weight, bias, out;
};

Apply prepare_apply(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                    std::string_view activation, bool allow_double) {
  FL_CHECK_VALUE(x.dim() >= 2, kApplyOp, "x must be [N, C, *spatial] (at least 2-D), got shape ", x.sizes());
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, {&rstd, "rstd"}}) {
    torch_glue::check_same_device(x, *t, kApplyOp, "x", name);
    FL_CHECK_VALUE(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) >= 1, kApplyOp, name,
                   " must be [N, groups] with N = ", x.size(0), ", got shape ", t->sizes());
    FL_CHECK_TYPE(t->scalar_type() == at::kFloat, kApplyOp, name, " must be torch.float32, got ",
                  torch_glue::python_dtype(t->scalar_type()));
  }
  FL_CHECK_VALUE(rstd.sizes() == mean.sizes(), kApplyOp, "mean and rstd must have the same shape, got ", mean.sizes(),
                 " and ", rstd.sizes());
  const int64_t groups = mean.size(1);
  FL_CHECK_VALUE(x.size(1) >= 1 && x.size(1) % groups == 0, kApplyOp, "mean and rstd must be [N, groups] with groups "
                 "dividing the ", x.size(1), " channels of x, got groups=", groups);
  const Shape shape = check_input(x, groups, allow_double, kApplyOp);
  Apply a;
  a.weight = checked_affine(weight, x, "weight", kApplyOp);
  a.bias = checked_affine(bias, x, "bias", kApplyOp);
  a.xc = canonical(x, shape.layout);
  a.mean = mean.contiguous();
  a.rstd = rstd.contiguous();
  a.out = empty_in_layout(x, shape.layout);
  GroupNormApplyParams& p = a.params;
  p.x = a.xc.data_ptr();
  p.mean = a.mean.data_ptr<float>();
  p.rstd = a.rstd.data_ptr<float>();
  p.weight = ptr_or_null(a.weight);
  p.bias = ptr_or_null(a.bias);
  p.out = a.out.data_ptr();
  set_sizes(p, shape, groups);
  p.activation = torch_glue::parse_activation(activation, kApplyOp);
  return a;
}

std::tuple<at::Tensor, at::Tensor> group_norm_stats_cpu(const at::Tensor& x, int64_t groups) {
  Stats st = prepare_stats(x, groups, /*allow_double=*/true);
  torch_glue::check_status(run_group_norm_stats_cpu(st.params));
  return {st.mean, st.m2};
}

at::Tensor group_norm_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                std::string_view activation) {
  Apply a = prepare_apply(x, mean, rstd, weight, bias, activation, /*allow_double=*/true);
  torch_glue::check_status(run_group_norm_apply_cpu(a.params));
  return a.out;
}

#ifdef FL_WITH_CUDA
at::Tensor workspace_for(const at::Tensor& x, int64_t n, int64_t c, int64_t s) {
  return at::empty({static_cast<int64_t>(group_norm_cuda_workspace_bytes(n, c, s))}, x.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> group_norm_stats_cuda(const at::Tensor& x, int64_t groups) {
  const c10::cuda::CUDAGuard guard(x.device());
  Stats st = prepare_stats(x, groups, /*allow_double=*/false);
  const at::Tensor workspace = workspace_for(x, st.params.n, st.params.c, st.params.s);
  st.params.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(launch_group_norm_stats_cuda(st.params, c10::cuda::getCurrentCUDAStream()));
  return {st.mean, st.m2};
}

at::Tensor group_norm_apply_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                                 const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                 std::string_view activation) {
  const c10::cuda::CUDAGuard guard(x.device());
  Apply a = prepare_apply(x, mean, rstd, weight, bias, activation, /*allow_double=*/false);
  const at::Tensor workspace = workspace_for(x, a.params.n, a.params.c, a.params.s);
  a.params.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(launch_group_norm_apply_cuda(a.params, c10::cuda::getCurrentCUDAStream()));
  return a.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                               const std::optional<at::Tensor>& bias, int64_t groups,
                                                               double eps, std::string_view activation,
                                                               const std::optional<at::Tensor>& residual) {
  const c10::cuda::CUDAGuard guard(x.device());
  Forward f = prepare_forward(x, weight, bias, groups, eps, activation, residual, /*allow_double=*/false);
  const at::Tensor workspace = at::empty(
      {static_cast<int64_t>(group_norm_cuda_workspace_bytes(f.params.n, f.params.c, f.params.s))},
      x.options().dtype(at::kByte));
  f.params.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(launch_group_norm_cuda(f.params, c10::cuda::getCurrentCUDAStream()));
  return {f.out, f.mean, f.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
    std::string_view activation) {
  const c10::cuda::CUDAGuard guard(x.device());
  Backward b = prepare_backward(grad_out, x, weight, bias, mean, rstd, groups, activation, /*allow_double=*/false);
  const at::Tensor workspace = at::empty(
      {static_cast<int64_t>(group_norm_backward_cuda_workspace_bytes(b.params.n, b.params.c, b.params.s))},
      x.options().dtype(at::kByte));
  b.params.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(launch_group_norm_backward_cuda(b.params, c10::cuda::getCurrentCUDAStream()));
  return {b.grad_x, b.grad_weight, b.grad_bias};
}
#endif

}  // namespace
}  // namespace fastlatent

TORCH_LIBRARY_FRAGMENT(fastlatent, m) {
  m.def("group_norm(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps=1e-05, str activation=\"none\", "
        "Tensor? residual=None) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def("group_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
        "int groups, str activation) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("group_norm_stats(Tensor x, int groups) -> (Tensor mean, Tensor m2)");
  m.def("group_norm_apply(Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
        "str activation=\"none\") -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlatent, CPU, m) {
  m.impl("group_norm", &fastlatent::group_norm_cpu);
  m.impl("group_norm_backward", &fastlatent::group_norm_backward_cpu);
  m.impl("group_norm_stats", &fastlatent::group_norm_stats_cpu);
  m.impl("group_norm_apply", &fastlatent::group_norm_apply_cpu);
}

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) {
  FL_REGISTER_CUDA(m, "group_norm", &fastlatent::group_norm_cuda);
  FL_REGISTER_CUDA(m, "group_norm_backward", &fastlatent::group_norm_backward_cuda);
  FL_REGISTER_CUDA(m, "group_norm_stats", &fastlatent::group_norm_stats_cuda);
  FL_REGISTER_CUDA(m, "group_norm_apply", &fastlatent::group_norm_apply_cuda);
}
