// The Python module fastlatent._C: importing it loads the shared library, which registers
// every operator with the dispatcher (static initialisers of csrc/torch/*.cpp). Ops are reached
// through torch.ops.fastlatent; the module itself defines build_info() and the direct lane of the
// sampler steps (_direct_<op>, direct_steps.h), which fastlatent.sampling.diffusers_fast calls in eager
// mode and which returns None wherever the op must go through the dispatcher.
#include <ATen/PythonTorchFunctionTLS.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string_view>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "build_info.h"
#include "direct_steps.h"

#ifndef FL_TORCH_VERSION
#define FL_TORCH_VERSION "unknown"
#endif
#ifndef FL_CUDA_ARCH_FLAGS
#define FL_CUDA_ARCH_FLAGS ""
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
  info["torch_version"] = FL_TORCH_VERSION;
  info["compiler"] = __VERSION__;
  info["cpu_simd"] = std::string(fastlatent::cpu_simd_level());
  info["openmp_version"] = fastlatent::openmp_version();
#ifdef _OPENMP
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp_max_threads"] = 1;
#endif
#ifdef FL_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(fastlatent::cuda_arch_list());
  info["cuda_arch_flags"] = FL_CUDA_ARCH_FLAGS;
  info["cuda_compiled_version"] = fastlatent::cuda_compiled_version();
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_arch_flags"] = "";
  info["cuda_compiled_version"] = 0;
#endif
  return info;
}

// Python-side conditions of the direct lane: tensor arguments are torch.Tensor itself (or Parameter), never
// a subclass, whose __torch_function__ or __torch_dispatch__ the op call would honour, and no torch function
// mode is active. Unpacked into `out`; false refuses the lane.
namespace {

bool exact_tensor(py::handle object, at::Tensor& out) {
  if (!THPVariable_CheckExact(object.ptr())) return false;
  out = THPVariable_Unpack(object.ptr());
  return true;
}

bool exact_optional_tensor(py::handle object, std::optional<at::Tensor>& out) {
  if (object.is_none()) return true;
  at::Tensor t;
  if (!exact_tensor(object, t)) return false;
  out = std::move(t);
  return true;
}

bool exact_tensor_list(py::handle object, std::vector<at::Tensor>& out) {
  if (!py::isinstance<py::list>(object) && !py::isinstance<py::tuple>(object)) return false;
  for (py::handle item : object) {
    at::Tensor t;
    if (!exact_tensor(item, t)) return false;
    out.push_back(std::move(t));
  }
  return true;
}

// Runs a lane without the GIL (as the op call does) when its Python-side conditions hold (`exact`: every
// tensor argument unpacked; no torch function mode): the op's (prev_sample, pred_x0), or None.
template <typename Call>
py::object run_lane(bool exact, Call&& call) {
  if (!exact || at::impl::torch_function_mode_enabled()) return py::none();
  fastlatent::direct::StepResult result;
  {
    py::gil_scoped_release no_gil;
    result = call();
  }
  if (!result) return py::none();
  return py::make_tuple(std::get<0>(*result), std::get<1>(*result));
}

py::object direct_ddim_step(py::handle model_output, py::handle sample, double alpha_bar_t, double alpha_bar_prev,
                            double eta, std::string_view prediction, bool use_clipped_model_output,
                            std::optional<double> guidance_scale, double guidance_rescale,
                            std::optional<double> clip_x0, std::optional<double> threshold_quantile,
                            double threshold_max, py::handle noise, int64_t seed, int64_t offset,
                            py::handle seed_offset, bool return_x0) {
  HANDLE_TH_ERRORS
  at::Tensor m, x;
  std::optional<at::Tensor> z, so;
  const bool exact = exact_tensor(model_output, m) && exact_tensor(sample, x) && exact_optional_tensor(noise, z) &&
                     exact_optional_tensor(seed_offset, so);
  return run_lane(exact, [&] {
    return fastlatent::direct::ddim_step(m, x, alpha_bar_t, alpha_bar_prev, eta, prediction, use_clipped_model_output,
                                         guidance_scale, guidance_rescale, clip_x0, threshold_quantile, threshold_max,
                                         z, seed, offset, so, return_x0);
  });
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object direct_euler_step(py::handle model_output, py::handle sample, double sigma, double sigma_next,
                             std::string_view prediction, std::optional<double> guidance_scale,
                             double guidance_rescale, std::optional<double> clip_x0,
                             std::optional<double> threshold_quantile, double threshold_max, bool return_x0) {
  HANDLE_TH_ERRORS
  at::Tensor m, x;
  const bool exact = exact_tensor(model_output, m) && exact_tensor(sample, x);
  return run_lane(exact, [&] {
    return fastlatent::direct::euler_step(m, x, sigma, sigma_next, prediction, guidance_scale, guidance_rescale,
                                          clip_x0, threshold_quantile, threshold_max, return_x0);
  });
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object direct_sampler_step(py::handle model_output, py::handle sample, double x0_x, double x0_m, double out_x,
                               double out_m, double out_x0, py::handle history,
                               const std::vector<double>& out_history, double out_noise,
                               std::optional<double> guidance_scale, double guidance_rescale,
                               std::optional<double> clip_x0, std::optional<double> threshold_quantile,
                               double threshold_max, py::handle noise, int64_t seed, int64_t offset,
                               py::handle seed_offset, bool return_x0) {
  HANDLE_TH_ERRORS
  at::Tensor m, x;
  std::vector<at::Tensor> h;
  std::optional<at::Tensor> z, so;
  const bool exact = exact_tensor(model_output, m) && exact_tensor(sample, x) && exact_tensor_list(history, h) &&
                     exact_optional_tensor(noise, z) && exact_optional_tensor(seed_offset, so);
  return run_lane(exact, [&] {
    return fastlatent::direct::sampler_step(m, x, x0_x, x0_m, out_x, out_m, out_x0, h, out_history, out_noise,
                                            guidance_scale, guidance_rescale, clip_x0, threshold_quantile,
                                            threshold_max, z, seed, offset, so, return_x0);
  });
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object direct_sampler_step_keeping_model_output(py::handle model_output, py::handle sample, double x0_x,
                                                   double x0_m, double out_x, double out_m, double out_x0,
                                                   bool return_x0) {
  HANDLE_TH_ERRORS
  at::Tensor m, x;
  if (!exact_tensor(model_output, m) || !exact_tensor(sample, x) || at::impl::torch_function_mode_enabled())
    return py::none();
  std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> result;
  {
    py::gil_scoped_release no_gil;
    result = fastlatent::direct::sampler_step_keeping_model_output(m, x, x0_x, x0_m, out_x, out_m, out_x0, return_x0);
  }
  if (!result) return py::none();
  return py::make_tuple(std::get<0>(*result), std::get<1>(*result), std::get<2>(*result));
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlatent compiled extension: registers torch.ops.fastlatent.*";
  m.def("build_info", &build_info, "How this extension was compiled (CUDA archs, SIMD, OpenMP).");
  // Keyword names and defaults are the ops' schemas' (csrc/torch/sampler_step.cpp).
  const char* lane = "The direct lane of the op of the same name (direct_steps.h): its result, or None.";
  m.def("_direct_ddim_step", &direct_ddim_step, lane, py::arg("model_output"), py::arg("sample"),
        py::arg("alpha_bar_t"), py::arg("alpha_bar_prev"), py::arg("eta") = 0.0, py::arg("prediction") = "epsilon",
        py::arg("use_clipped_model_output") = false, py::arg("guidance_scale") = py::none(),
        py::arg("guidance_rescale") = 0.0, py::arg("clip_x0") = py::none(), py::arg("threshold_quantile") = py::none(),
        py::arg("threshold_max") = 1.0, py::arg("noise") = py::none(), py::arg("seed") = 0, py::arg("offset") = 0,
        py::arg("seed_offset") = py::none(), py::arg("return_x0") = true);
  m.def("_direct_euler_step", &direct_euler_step, lane, py::arg("model_output"), py::arg("sample"),
        py::arg("sigma"), py::arg("sigma_next"), py::arg("prediction") = "epsilon",
        py::arg("guidance_scale") = py::none(), py::arg("guidance_rescale") = 0.0, py::arg("clip_x0") = py::none(),
        py::arg("threshold_quantile") = py::none(), py::arg("threshold_max") = 1.0, py::arg("return_x0") = true);
  m.def("_direct_sampler_step", &direct_sampler_step, lane, py::arg("model_output"), py::arg("sample"),
        py::arg("x0_x"), py::arg("x0_m"), py::arg("out_x"), py::arg("out_m"), py::arg("out_x0"), py::arg("history"),
        py::arg("out_history"), py::arg("out_noise") = 0.0, py::arg("guidance_scale") = py::none(),
        py::arg("guidance_rescale") = 0.0, py::arg("clip_x0") = py::none(), py::arg("threshold_quantile") = py::none(),
        py::arg("threshold_max") = 1.0, py::arg("noise") = py::none(), py::arg("seed") = 0, py::arg("offset") = 0,
        py::arg("seed_offset") = py::none(), py::arg("return_x0") = true);
  m.def("_direct_sampler_step_keeping_model_output", &direct_sampler_step_keeping_model_output,
        "sampler_step's lane without history, noise, guidance or x0 processing, on CPU tensors, returning a copy "
        "of the model output too, written in the same pass (direct_steps.h): (out, x0, copy), or None.",
        py::arg("model_output"), py::arg("sample"), py::arg("x0_x"), py::arg("x0_m"), py::arg("out_x"),
        py::arg("out_m"), py::arg("out_x0"), py::arg("return_x0") = true);
}
