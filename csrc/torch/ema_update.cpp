// Binding for ema_update_: in-place EMA codebook update.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "ema_update.h"

#ifdef FL_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastlatent {
namespace {

constexpr const char* kOp = "ema_update_";

void check_fp32(const at::Tensor& t, const char* name) {
  FL_CHECK_TYPE(t.scalar_type() == at::kFloat, kOp, name, " must be torch.float32, got ",
                torch_glue::python_dtype(t.scalar_type()));
}

// Updated in place: a copy would silently drop the update, so layout is checked, not fixed.
void check_in_place(const at::Tensor& t, const char* name) {
  FL_CHECK_VALUE(t.is_contiguous(), kOp, name, " is updated in place and must be contiguous");
}

EmaUpdateParams check_args(const at::Tensor& cluster_size, const at::Tensor& embed_sum,
                           const at::Tensor& codebook, const at::Tensor& counts, const at::Tensor& sums,
                           double decay, double eps) {
  using namespace torch_glue;
  check_dim(codebook, 2, kOp, "codebook", "[K, D]");
  const int64_t k = codebook.size(0), d = codebook.size(1);
  FL_CHECK_VALUE(k >= 1 && d >= 1, kOp, "codebook must be [K, D] with K, D >= 1, got shape ", codebook.sizes());
  FL_CHECK_VALUE(cluster_size.dim() == 1 && cluster_size.size(0) == k, kOp,
                 "cluster_size must be [K] = [", k, "], got shape ", cluster_size.sizes());
  FL_CHECK_VALUE(counts.dim() == 1 && counts.size(0) == k, kOp, "counts must be [K] = [", k,
                 "], got shape ", counts.sizes());
  FL_CHECK_VALUE(embed_sum.sizes() == codebook.sizes(), kOp, "embed_sum must be [K, D] = ", codebook.sizes(),
                 ", got shape ", embed_sum.sizes());
  FL_CHECK_VALUE(sums.sizes() == codebook.sizes(), kOp, "sums must be [K, D] = ", codebook.sizes(),
                 ", got shape ", sums.sizes());
  for (const auto& [t, name] : {std::pair{&cluster_size, "cluster_size"}, {&embed_sum, "embed_sum"},
                                {&counts, "counts"}, {&sums, "sums"}}) {
    check_same_device(codebook, *t, kOp, "codebook", name);
    check_fp32(*t, name);
  }
  check_in_place(cluster_size, "cluster_size");
  check_in_place(embed_sum, "embed_sum");
  check_in_place(codebook, "codebook");
  FL_CHECK_VALUE(decay >= 0.0 && decay <= 1.0, kOp, "decay must be in [0, 1], got ", decay);
  // the kernel computes in float32: an eps that is inf (or NaN) there turns the whole codebook into NaN
  FL_CHECK_VALUE(eps >= 0.0 && eps <= std::numeric_limits<float>::max(), kOp,
                 "eps must be a finite float32 value >= 0, got ", eps);
  EmaUpdateParams p;
  p.codebook_dtype = kernel_dtype(codebook, kOp, "codebook");
  p.k = k;
  p.d = d;
  p.decay = static_cast<float>(decay);
  p.eps = static_cast<float>(eps);
  return p;
}

void fill_pointers(EmaUpdateParams& p, at::Tensor& cluster_size, at::Tensor& embed_sum, at::Tensor& codebook,
                   const at::Tensor& counts, const at::Tensor& sums) {
  p.cluster_size = cluster_size.data_ptr<float>();
  p.embed_sum = embed_sum.data_ptr<float>();
  p.codebook = codebook.data_ptr();
  p.counts = counts.data_ptr<float>();
  p.sums = sums.data_ptr<float>();
}

void ema_update_cpu(at::Tensor& cluster_size, at::Tensor& embed_sum, at::Tensor& codebook, const at::Tensor& counts,
                    const at::Tensor& sums, double decay, double eps) {
  EmaUpdateParams p = check_args(cluster_size, embed_sum, codebook, counts, sums, decay, eps);
  const at::Tensor cc = counts.contiguous(), sc = sums.contiguous();
  fill_pointers(p, cluster_size, embed_sum, codebook, cc, sc);
  torch_glue::check_status(run_ema_update_cpu(p));
}

#ifdef FL_WITH_CUDA
void ema_update_cuda(at::Tensor& cluster_size, at::Tensor& embed_sum, at::Tensor& codebook, const at::Tensor& counts,
                     const at::Tensor& sums, double decay, double eps) {
  EmaUpdateParams p = check_args(cluster_size, embed_sum, codebook, counts, sums, decay, eps);
  const c10::cuda::CUDAGuard guard(codebook.device());
  const at::Tensor cc = counts.contiguous(), sc = sums.contiguous();
  const at::Tensor workspace = at::empty({static_cast<int64_t>(ema_update_cuda_workspace_bytes())},
                                         codebook.options().dtype(at::kByte));
  fill_pointers(p, cluster_size, embed_sum, codebook, cc, sc);
  p.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(launch_ema_update_cuda(p, c10::cuda::getCurrentCUDAStream()));
}
#endif

// The ADInplaceOrView kernel torch generates for its own in-place ops: bump the version counter of every
// mutated tensor, so that autograd raises "modified by an inplace operation" for a graph that saved one of
// them, then run the backend kernel.
void ema_update_ad_inplace_or_view(at::Tensor& cluster_size, at::Tensor& embed_sum, at::Tensor& codebook,
                                   const at::Tensor& counts, const at::Tensor& sums, double decay, double eps) {
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastlatent::ema_update_", "")
                               .typed<void(at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, double, double)>();
    op.call(cluster_size, embed_sum, codebook, counts, sums, decay, eps);
  }
  for (const at::Tensor* t : {&cluster_size, &embed_sum, &codebook}) {
    torch::autograd::impl::bump_version(*t);
  }
}

}  // namespace
}  // namespace fastlatent

TORCH_LIBRARY_FRAGMENT(fastlatent, m) {
  m.def("ema_update_(Tensor(a!) cluster_size, Tensor(b!) embed_sum, Tensor(c!) codebook, Tensor counts, "
        "Tensor sums, float decay, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(fastlatent, CPU, m) { m.impl("ema_update_", &fastlatent::ema_update_cpu); }

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) { FL_REGISTER_CUDA(m, "ema_update_", &fastlatent::ema_update_cuda); }

TORCH_LIBRARY_IMPL(fastlatent, ADInplaceOrView, m) {
  m.impl("ema_update_", &fastlatent::ema_update_ad_inplace_or_view);
}
