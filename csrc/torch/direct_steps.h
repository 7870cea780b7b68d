// The direct lane of the sampler-step ops used in every step of a patched diffusers scheduler (ddim_step,
// euler_step, sampler_step): the registered op's own plan (checks, coefficients, outputs) and kernel, called
// without the dispatcher's boxed argument parsing. A step's host time on the CPU is mostly fixed cost, and
// that parsing was most of it: sampler_step's call took 17 us on a 16-element sample through
// torch.ops.fastlatent.sampler_step.default, where the plan and kernel take about 4 (2-core EPYC CI machine).
//
// A lane only runs what the dispatcher would run unchanged: every tensor a plain dense CPU or CUDA tensor
// (autograd and inference tensors alike), and no dispatch key in the thread's included set beyond the usual
// two (no Python or functorch mode, no functionalization). Otherwise it returns nullopt and the caller calls
// the op. The Python entry points (module.cpp) add what only Python can see (tensor subclasses, torch
// function modes), and the caller keeps the op under torch.compile. Same exceptions and messages as the op.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace fastlatent {
namespace direct {

using StepResult = std::optional<std::tuple<at::Tensor, at::Tensor>>;

StepResult ddim_step(const at::Tensor& model_output, const at::Tensor& sample, double alpha_bar_t,
                     double alpha_bar_prev, double eta, std::string_view prediction, bool use_clipped_model_output,
                     std::optional<double> guidance_scale, double guidance_rescale, std::optional<double> clip_x0,
                     std::optional<double> threshold_quantile, double threshold_max,
                     const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                     const std::optional<at::Tensor>& seed_offset, bool return_x0);

StepResult euler_step(const at::Tensor& model_output, const at::Tensor& sample, double sigma, double sigma_next,
                      std::string_view prediction, std::optional<double> guidance_scale, double guidance_rescale,
                      std::optional<double> clip_x0, std::optional<double> threshold_quantile, double threshold_max,
                      bool return_x0);

StepResult sampler_step(const at::Tensor& model_output, const at::Tensor& sample, double x0_x, double x0_m,
                        double out_x, double out_m, double out_x0, const std::vector<at::Tensor>& history,
                        const std::vector<double>& out_history, double out_noise,
                        std::optional<double> guidance_scale, double guidance_rescale, std::optional<double> clip_x0,
                        std::optional<double> threshold_quantile, double threshold_max,
                        const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                        const std::optional<at::Tensor>& seed_offset, bool return_x0);

// sampler_step without history, noise, guidance or x0 processing, returning a copy of the model output too,
// written by the CPU kernel in the same pass (HeunDiscreteScheduler's first stage stores the model output it
// stepped with, as a tensor of its own). nullopt outside the lane's conditions and for CUDA tensors (the
// caller then calls the op and copies).
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> sampler_step_keeping_model_output(
    const at::Tensor& model_output, const at::Tensor& sample, double x0_x, double x0_m, double out_x, double out_m,
    double out_x0, bool return_x0);

}  // namespace direct
}  // namespace fastlatent
