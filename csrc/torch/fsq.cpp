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

// fsq_quantize: checked params, outputs, and the kernel arguments pointing into them.
struct QuantizeCall {
  FsqParams p;
  FsqForwardArgs args;
  at::Tensor zc, z_hat, indices;
};

QuantizeCall prepare_quantize(const at::Tensor& z, c10::IntArrayRef levels, bool preserve_symmetry) {
  QuantizeCall c;
  c.p = check_quantize(z, levels, preserve_symmetry, "fsq_quantize");
  c.zc = z.contiguous();
  c.z_hat = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  c.indices = at::empty(z.sizes().slice(0, z.dim() - 1), z.options().dtype(at::kLong));
  c.args.z = c.zc.data_ptr();
  c.args.z_hat = c.z_hat.data_ptr();
  c.args.indices = c.indices.data_ptr<int64_t>();
  return c;
}

std::tuple<at::Tensor, at::Tensor> fsq_quantize_cpu(const at::Tensor& z, c10::IntArrayRef levels,
                                                    bool preserve_symmetry) {
  const QuantizeCall c = prepare_quantize(z, levels, preserve_symmetry);
  torch_glue::check_status(run_fsq_quantize_cpu(c.p, c.args));
  return {c.z_hat, c.indices};
}

// fsq_quantize_backward: as above.
struct BackwardCall {
  FsqParams p;
  FsqBackwardArgs args;
  at::Tensor gc, zc, grad_z;
};

BackwardCall prepare_backward(const at::Tensor& grad_z_hat, const at::Tensor& z, c10::IntArrayRef levels,
                              bool preserve_symmetry) {
  constexpr const char* kOp = "fsq_quantize_backward";
  BackwardCall c;
  c.p = check_quantize(z, levels, preserve_symmetry, kOp);
  torch_glue::check_same_device(grad_z_hat, z, kOp, "grad_z_hat", "z");
  torch_glue::check_same_dtype(grad_z_hat, z, kOp, "grad_z_hat", "z");
  torch_glue::check_same_shape(grad_z_hat, z, kOp, "grad_z_hat", "z");
  c.gc = grad_z_hat.contiguous();
  c.zc = z.contiguous();
  c.grad_z = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  c.args.grad_z_hat = c.gc.data_ptr();
  c.args.z = c.zc.data_ptr();
  c.args.grad_z = c.grad_z.data_ptr();
  return c;
}

at::Tensor fsq_quantize_backward_cpu(const at::Tensor& grad_z_hat, const at::Tensor& z, c10::IntArrayRef levels,
                                     bool preserve_symmetry) {
  const BackwardCall c = prepare_backward(grad_z_hat, z, levels, preserve_symmetry);
  torch_glue::check_status(run_fsq_quantize_backward_cpu(c.p, c.args));
  return c.grad_z;
}

// fsq_indices_to_codes: as above (float64 codes on the CPU only).
struct CodesCall {
  FsqParams p;
  FsqCodesArgs args;
  at::Tensor ic, codes;
};

CodesCall prepare_codes(const at::Tensor& indices, c10::IntArrayRef levels, bool preserve_symmetry,
                        std::optional<at::ScalarType> dtype, bool cuda) {
  constexpr const char* kOp = "fsq_indices_to_codes";
  CodesCall c;
  c.p = make_params(levels, preserve_symmetry, kOp);
  c.ic = torch_glue::index_tensor(indices, kOp, "indices");
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  c.p.dtype = torch_glue::kernel_dtype(out_type, kOp, "dtype", /*allow_double=*/!cuda);
  c.p.rows = indices.numel();
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.push_back(c.p.d);
  c.codes = at::empty(shape, indices.options().dtype(out_type));
  c.args.indices = c.ic.data_ptr<int64_t>();
  c.args.codes = c.codes.data_ptr();
  return c;
}

at::Tensor fsq_indices_to_codes_cpu(const at::Tensor& indices, c10::IntArrayRef levels, bool preserve_symmetry,
                                    std::optional<at::ScalarType> dtype) {
  const CodesCall c = prepare_codes(indices, levels, preserve_symmetry, dtype, /*cuda=*/false);
  torch_glue::check_status(run_fsq_indices_to_codes_cpu(c.p, c.args));
  return c.codes;
}

#ifdef FL_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> fsq_quantize_cuda(const at::Tensor& z, c10::IntArrayRef levels,
                                                     bool preserve_symmetry) {
  const QuantizeCall c = prepare_quantize(z, levels, preserve_symmetry);
  const c10::cuda::CUDAGuard guard(z.device());
  C10_CUDA_CHECK(launch_fsq_quantize_cuda(c.p, c.args, c10::cuda::getCurrentCUDAStream()));
  return {c.z_hat, c.indices};
}

at::Tensor fsq_quantize_backward_cuda(const at::Tensor& grad_z_hat, const at::Tensor& z, c10::IntArrayRef levels,
                                      bool preserve_symmetry) {
  const BackwardCall c = prepare_backward(grad_z_hat, z, levels, preserve_symmetry);
  const c10::cuda::CUDAGuard guard(z.device());
  C10_CUDA_CHECK(launch_fsq_quantize_backward_cuda(c.p, c.args, c10::cuda::getCurrentCUDAStream()));
  return c.grad_z;
}

at::Tensor fsq_indices_to_codes_cuda(const at::Tensor& indices, c10::IntArrayRef levels, bool preserve_symmetry,
                                     std::optional<at::ScalarType> dtype) {
  const CodesCall c = prepare_codes(indices, levels, preserve_symmetry, dtype, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(indices.device());
  C10_CUDA_CHECK(launch_fsq_indices_to_codes_cuda(c.p, c.args, c10::cuda::getCurrentCUDAStream()));
  return c.codes;
}
#endif

}  // namespace
}  // namespace fastlatent

TORCH_LIBRARY_FRAGMENT(fastlatent, m) {
  m.def("fsq_quantize(Tensor z, int[] levels, bool preserve_symmetry=False) -> (Tensor z_hat, Tensor indices)");
  m.def("fsq_quantize_backward(Tensor grad_z_hat, Tensor z, int[] levels, bool preserve_symmetry=False) -> Tensor");
  m.def("fsq_indices_to_codes(Tensor indices, int[] levels, bool preserve_symmetry=False, "
        "ScalarType? dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlatent, CPU, m) {
  m.impl("fsq_quantize", &fastlatent::fsq_quantize_cpu);
  m.impl("fsq_quantize_backward", &fastlatent::fsq_quantize_backward_cpu);
  m.impl("fsq_indices_to_codes", &fastlatent::fsq_indices_to_codes_cpu);
}

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) {
  FL_REGISTER_CUDA(m, "fsq_quantize", &fastlatent::fsq_quantize_cuda);
  FL_REGISTER_CUDA(m, "fsq_quantize_backward", &fastlatent::fsq_quantize_backward_cuda);
  FL_REGISTER_CUDA(m, "fsq_indices_to_codes", &fastlatent::fsq_indices_to_codes_cuda);
}
