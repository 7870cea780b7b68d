// Argument checks and glue shared by every binding. Only csrc/torch includes torch.
//
// Messages name the op, the argument and what was expected, e.g.
//   fastlatent.nearest_code: codebook must be 2-D [K, D], got [3, 4, 5]
// Shape/value problems raise ValueError, dtype problems TypeError, device problems
// RuntimeError: the Python fake impls in fastlatent/ops raise the same.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <string_view>

#include "activations.h"
#include "common.h"

// The op library the bindings call back into: "fastlatent_emu" in the emulated build (csrc/emu).
#ifndef FL_OP_NAMESPACE
#define FL_OP_NAMESPACE "fastlatent"
#endif

namespace fastlatent {
namespace torch_glue {

#define FL_CHECK_VALUE(cond, op, ...) TORCH_CHECK_VALUE(cond, "fastlatent.", op, ": ", __VA_ARGS__)
#define FL_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE(cond, "fastlatent.", op, ": ", __VA_ARGS__)
#define FL_CHECK(cond, op, ...) TORCH_CHECK(cond, "fastlatent.", op, ": ", __VA_ARGS__)

// The Python spelling of a dtype ("torch.int64"), so messages match what users typed.
inline std::string python_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// The kernel dtype of a floating tensor; TypeError naming the argument otherwise.
// fp64 is accepted only where `allow_double` (CPU gradcheck paths).
inline DType kernel_dtype(at::ScalarType type, const char* op, const char* name,
                          bool allow_double = false) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble:
      if (allow_double) return DType::kFloat64;
      break;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "fastlatent.", op, ": ", name,
                   " must be float32, float16 or bfloat16", allow_double ? " (or float64)" : "",
                   ", got ", python_dtype(type));
}

inline DType kernel_dtype(const at::Tensor& t, const char* op, const char* name,
                          bool allow_double = false) {
  return kernel_dtype(t.scalar_type(), op, name, allow_double);
}

// Activation names shared by the fused ops.
inline Activation parse_activation(std::string_view name, const char* op) {
  if (name == "none") return Activation::kNone;
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  TORCH_CHECK_VALUE(false, "fastlatent.", op, ": activation must be \"none\", \"silu\" or \"gelu\", got \"",
                    std::string(name), "\"");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* layout) {
  FL_CHECK_VALUE(t.dim() == dim, op, name, " must be ", dim, "-D ", layout, ", got shape ",
                 t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  FL_CHECK(a.device() == b.device(), op, name_a, " and ", name_b,
           " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* name_a, const char* name_b) {
  FL_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, name_a, " and ", name_b,
                " must have the same dtype, got ", python_dtype(a.scalar_type()), " and ",
                python_dtype(b.scalar_type()));
}

// An optional 1-D floating tensor of `size` elements on x's device (affine weights, biases): messages
// name it and the size as `what`, e.g. "weight must be [C] = [6], got shape [5]".
inline void check_floating_vector(const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t size,
                                  const char* op, const char* name, const char* what) {
  if (!t.has_value()) return;
  check_same_device(x, *t, op, "x", name);
  FL_CHECK_VALUE(t->dim() == 1 && t->size(0) == size, op, name, " must be [", what, "] = [", size, "], got shape ",
                 t->sizes());
  FL_CHECK_TYPE(t->is_floating_point(), op, name, " must be a floating tensor, got ", python_dtype(t->scalar_type()));
}

// At least one dimension, and the last one (channels, channel-last layout) equal to `d`.
inline void check_last_dim(const at::Tensor& t, int64_t d, const char* op, const char* name,
                           const char* what) {
  FL_CHECK_VALUE(t.dim() >= 1 && t.size(-1) == d, op, name, " must be [..., ", what, "] with ", what,
                 "=", d, " in its last dim, got shape ", t.sizes());
}

inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* name_a, const char* name_b) {
  FL_CHECK_VALUE(a.sizes() == b.sizes(), op, name_a, " and ", name_b,
                 " must have the same shape, got ", a.sizes(), " and ", b.sizes());
}

// An integer index tensor: int64, or int32 (vector-quantize-pytorch's index dtype), which
// is widened. TypeError naming the argument otherwise.
inline at::Tensor index_tensor(const at::Tensor& t, const char* op, const char* name) {
  FL_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, name,
                " must be torch.int64 or torch.int32, got ", python_dtype(t.scalar_type()));
  return t.scalar_type() == at::kLong ? t.contiguous() : t.to(at::kLong).contiguous();
}

// A positive, finite float argument (scales, inverse temperatures).
inline void check_positive(double value, const char* op, const char* name) {
  FL_CHECK_VALUE(value > 0 && value < std::numeric_limits<double>::infinity(), op, name,
                 " must be a positive finite number, got ", value);
}

// Last dim (channels, channel-last) between 1 and max_d.
inline int check_channels(const at::Tensor& t, int max_d, const char* op, const char* name, const char* what) {
  FL_CHECK_VALUE(t.dim() >= 1 && t.size(-1) >= 1 && t.size(-1) <= max_d, op, name, " must be [..., d] with 1 <= d <= ",
                 max_d, " (", what, ") in its last dim, got shape ", t.sizes());
  return static_cast<int>(t.size(-1));
}

// Element type of the float outputs of an op whose math type follows its input: float64 for
// float64 inputs (CPU gradcheck), float32 otherwise.
inline at::ScalarType math_scalar_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A tensor of the given shape and dtype, on t's device; message names the argument.
inline void check_tensor_like(const at::Tensor& g, c10::IntArrayRef shape, at::ScalarType type, const at::Tensor& ref,
                              const char* op, const char* name) {
  FL_CHECK(g.device() == ref.device(), op, name, " must be on ", ref.device(), ", got ", g.device());
  FL_CHECK_TYPE(g.scalar_type() == type, op, name, " must be ", python_dtype(type), ", got ",
                python_dtype(g.scalar_type()));
  FL_CHECK_VALUE(g.sizes() == shape, op, name, " must have shape ", shape, ", got ", g.sizes());
}

inline void check_status(const Status& status) {
  TORCH_CHECK(status.ok, "fastlatent.", status.message);
}

// Registered for the CUDA key when the extension was built without CUDA kernels, so a
// CUDA tensor gets this message instead of the dispatcher's list of backends.
inline void no_cuda_kernel(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, "fastlatent: ", op.schema().name(),
              " got a CUDA tensor, but this build of fastlatent has no CUDA kernels. "
              "Rebuild on a machine with nvcc and a CUDA build of torch: "
              "FASTLATENT_CUDA=1 pip install --no-build-isolation --no-deps -e . "
              "(see `fastlatent info`).");
}

}  // namespace torch_glue
}  // namespace fastlatent

#ifdef FL_WITH_CUDA
#define FL_REGISTER_CUDA(m, name, fn) m.impl(name, fn)
#else
#define FL_REGISTER_CUDA(m, name, fn) \
  m.impl(name, torch::CppFunction::makeFromBoxedFunction<&::fastlatent::torch_glue::no_cuda_kernel>())
#endif
