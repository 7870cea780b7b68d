// Bindings for FSQ: fsq_quantize, fsq_quantize_backward, fsq_indices_to_codes.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <sstream>
#include <tuple>

#include "checks.h"
#include "fsq.h"

#ifdef FL_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastlatent {
namespace {

// levels: non-empty, every level >= 2, product <= 2^31 (indices stay exact in int64 and the
// implicit codebook stays addressable by torch's int32-indexed kernels).
FsqParams make_params(c10::IntArrayRef levels, bool preserve_symmetry, const char* op) {
  FL_CHECK_VALUE(!levels.empty(), op, "levels must be a non-empty list of ints, got []");
  int64_t product = 1;
  for (const int64_t level : levels) {
    FL_CHECK_VALUE(level >= 2, op, "levels must all be >= 2, got ", levels);
    // Compared before multiplying: product * level itself may overflow int64 ([2, 2**62]).
    FL_CHECK_VALUE(level <= (int64_t{1} << 31) / product, op,
                   "the product of levels (the implicit codebook size) must be <= 2^31, got ", levels);
    product *= level;
  }
  FsqParams p;
  fsq_make_constants(levels.data(), static_cast<int>(levels.size()), preserve_symmetry, p);
  return p;
}

FsqParams check_quantize(const at::Tensor& z, c10::IntArrayRef levels, bool preserve_symmetry, const char* op) {
  FsqParams p = make_params(levels, preserve_symmetry, op);
  p.dtype = torch_glue::kernel_dtype(z, op, "z", /*allow_double=*/!z.is_cuda());
  torch_glue::check_last_dim(z, p.d, op, "z", "len(levels)");
  p.rows = z.numel() / p.d;
  return p;
}

template <bool kCuda>
std::tuple<at::Tensor, at::Tensor> fsq_quantize_impl(const at::Tensor& z, c10::IntArrayRef levels,
                                                     bool preserve_symmetry) {
  constexpr const char* kOp = "fsq_quantize";
  FsqParams p = check_quantize(z, levels, preserve_symmetry, kOp);
  const at::Tensor zc = z.contiguous();
  at::Tensor z_hat = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor indices = at::empty(z.sizes().slice(0, z.dim() - 1), z.options().dtype(at::kLong));
  FsqForwardArgs args;
  args.z = zc.data_ptr();
  args.z_hat = z_hat.data_ptr();
  args.indices = indices.data_ptr<int64_t>();
  if constexpr (kCuda) {
#ifdef FL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(z.device());
    C10_CUDA_CHECK(launch_fsq_quantize_cuda(p, args, c10::cuda::getCurrentCUDAStream()));
#endif
  } else {
    torch_glue::check_status(run_fsq_quantize_cpu(p, args));
  }
  return {z_hat, indices};
}

template <bool kCuda>
at::Tensor fsq_quantize_backward_impl(const at::Tensor& grad_z_hat, const at::Tensor& z,
                                      c10::IntArrayRef levels, bool preserve_symmetry) {
  constexpr const char* kOp = "fsq_quantize_backward";
  FsqParams p = check_quantize(z, levels, preserve_symmetry, kOp);
  torch_glue::check_same_device(grad_z_hat, z, kOp, "grad_z_hat", "z");
  torch_glue::check_same_dtype(grad_z_hat, z, kOp, "grad_z_hat", "z");
  torch_glue::check_same_shape(grad_z_hat, z, kOp, "grad_z_hat", "z");
  const at::Tensor gc = grad_z_hat.contiguous(), zc = z.contiguous();
  at::Tensor grad_z = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  FsqBackwardArgs args;
  args.grad_z_hat = gc.data_ptr();
  args.z = zc.data_ptr();
  args.grad_z = grad_z.data_ptr();
  if constexpr (kCuda) {
#ifdef FL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(z.device());
    C10_CUDA_CHECK(launch_fsq_quantize_backward_cuda(p, args, c10::cuda::getCurrentCUDAStream()));
#endif
  } else {
    torch_glue::check_status(run_fsq_quantize_backward_cpu(p, args));
  }
  return grad_z;
}

template <bool kCuda>
at::Tensor fsq_indices_to_codes_impl(const at::Tensor& indices, c10::IntArrayRef levels, bool preserve_symmetry,
                                     std::optional<at::ScalarType> dtype) {
  constexpr const char* kOp = "fsq_indices_to_codes";
  FsqParams p = make_params(levels, preserve_symmetry, kOp);
  const at::Tensor ic = torch_glue::index_tensor(indices, kOp, "indices");
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  p.dtype = torch_glue::kernel_dtype(out_type, kOp, "dtype", /*allow_double=*/!kCuda);
  p.rows = indices.numel();
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.push_back(p.d);
  at::Tensor codes = at::empty(shape, indices.options().dtype(out_type));
  FsqCodesArgs args;
  args.indices = ic.data_ptr<int64_t>();
  args.codes = codes.data_ptr();
  if constexpr (kCuda) {
#ifdef FL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(indices.device());
    C10_CUDA_CHECK(launch_fsq_indices_to_codes_cuda(p, args, c10::cuda::getCurrentCUDAStream()));
#endif
  } else {
    torch_glue::check_status(run_fsq_indices_to_codes_cpu(p, args));
  }
  return codes;
}

}  // namespace
}  // namespace fastlatent

TORCH_LIBRARY_FRAGMENT(fastlatent, m) {
  m.def("fsq_quantize(Tensor z, int[] levels, bool preserve_symmetry=False) -> (Tensor z_hat, Tensor indices)");
  m.def("fsq_quantize_backward(Tensor grad_z_hat, Tensor z, int[] levels, bool preserve_symmetry=False) -> Tensor");
  m.def("fsq_indices_to_codes(Tensor indices, int[] levels, bool preserve_symmetry=False, "
        "ScalarType? dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlatent, CPU, m) {
  m.impl("fsq_quantize", &fastlatent::fsq_quantize_impl<false>);
  m.impl("fsq_quantize_backward", &fastlatent::fsq_quantize_backward_impl<false>);
  m.impl("fsq_indices_to_codes", &fastlatent::fsq_indices_to_codes_impl<false>);
}

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) {
  FL_REGISTER_CUDA(m, "fsq_quantize", &fastlatent::fsq_quantize_impl<true>);
  FL_REGISTER_CUDA(m, "fsq_quantize_backward", &fastlatent::fsq_quantize_backward_impl<true>);
  FL_REGISTER_CUDA(m, "fsq_indices_to_codes", &fastlatent::fsq_indices_to_codes_impl<true>);
}
