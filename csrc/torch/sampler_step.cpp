// Bindings for the fused sampler steps: ddpm_step, ddim_step, euler_step, dpmpp_2m_step,
// convert_prediction, and sampler_step, the generic form (the caller's coefficients over the sample,
// the model output, the processed x0, up to three earlier tensors and noise) that diffusers'
// multistep and ancestral schedulers are folded into. Each op checks its arguments, folds its
// schedule scalars into the kernel's coefficients on the host (double precision, no device sync)
// and runs the one sampler kernel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <initializer_list>

#include <cmath>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "checks.h"
#include "direct_steps.h"
#include "sampler_step.h"

#ifdef FL_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastlatent {
namespace {

using torch_glue::python_dtype;

Prediction parse_prediction(const char* op, const char* name, std::string_view value) {
  if (value == "epsilon") return Prediction::kEpsilon;
  if (value == "v_prediction") return Prediction::kVPrediction;
  if (value == "sample") return Prediction::kSample;
  if (value == "flow") return Prediction::kFlow;
  FL_CHECK_VALUE(false, op, name, " must be \"epsilon\", \"v_prediction\", \"sample\" or \"flow\", got \"",
                 std::string(value), "\"");
  return Prediction::kEpsilon;
}

// Guidance and x0 options shared by every step.
struct Options {
  std::optional<double> guidance_scale;
  double guidance_rescale = 0.0;
  std::optional<double> clip_x0;
  std::optional<double> threshold_quantile;
  double threshold_max = 1.0;
};

void check_like_sample(const char* op, const at::Tensor& t, const at::Tensor& sample, const char* name) {
  using namespace torch_glue;
  check_same_device(sample, t, op, "sample", name);
  check_same_dtype(sample, t, op, "sample", name);
  FL_CHECK_VALUE(t.sizes() == sample.sizes(), op, name, " must have the shape of sample ", sample.sizes(),
                 ", got ", t.sizes());
}

// Checks shared by every op; fills sizes, dtype and the guidance/x0 options.
SamplerStepParams check_common(const char* op, const at::Tensor& model_output, const at::Tensor& sample,
                               const Options& o) {
  using namespace torch_glue;
  FL_CHECK_VALUE(sample.dim() >= 1, op, "sample must be at least 1-D [B, ...], got shape ", sample.sizes());
  SamplerStepParams p;
  p.dtype = kernel_dtype(sample, op, "sample");
  check_same_device(sample, model_output, op, "sample", "model_output");
  check_same_dtype(sample, model_output, op, "sample", "model_output");
  p.batch = sample.size(0);
  p.n = 1;
  for (int64_t d = 1; d < sample.dim(); ++d) p.n *= sample.size(d);
  p.guided = o.guidance_scale.has_value();
  if (p.guided) {
    FL_CHECK_VALUE(model_output.dim() == sample.dim() && model_output.size(0) % 2 == 0, op,
                   "guidance needs model_output = [uncond; cond] stacked in the batch (an even batch of 2B), "
                   "got shape ", model_output.sizes());
    FL_CHECK_VALUE(model_output.size(0) == 2 * p.batch && model_output.sizes().slice(1) == sample.sizes().slice(1),
                   op, "with guidance model_output must be [2B, ...] for sample ", sample.sizes(), ", got ",
                   model_output.sizes());
    FL_CHECK_VALUE(std::isfinite(*o.guidance_scale), op, "guidance_scale must be finite, got ", *o.guidance_scale);
    p.guidance_scale = static_cast<float>(*o.guidance_scale);
  } else {
    FL_CHECK_VALUE(model_output.sizes() == sample.sizes(), op, "model_output must have the shape of sample ",
                   sample.sizes(), " (or [2B, ...] with guidance_scale), got ", model_output.sizes());
  }
  FL_CHECK_VALUE(o.guidance_rescale >= 0.0 && o.guidance_rescale <= 1.0, op, "guidance_rescale must be in [0, 1], got ",
                 o.guidance_rescale);
  if (o.guidance_rescale > 0.0) {
    FL_CHECK_VALUE(p.guided, op, "guidance_rescale needs guidance_scale");
    FL_CHECK_VALUE(p.n >= 2, op, "guidance_rescale needs at least 2 elements per sample, got ", p.n);
  }
  p.guidance_rescale = static_cast<float>(o.guidance_rescale);
  FL_CHECK_VALUE(!(o.clip_x0 && o.threshold_quantile), op, "clip_x0 and threshold_quantile are exclusive, got both");
  if (o.clip_x0) {
    FL_CHECK_VALUE(*o.clip_x0 > 0.0 && std::isfinite(*o.clip_x0), op, "clip_x0 must be > 0, got ", *o.clip_x0);
    p.x0_mode = X0Mode::kClip;
    p.clip = static_cast<float>(*o.clip_x0);
  }
  if (o.threshold_quantile) {
    FL_CHECK_VALUE(*o.threshold_quantile > 0.0 && *o.threshold_quantile <= 1.0, op,
                   "threshold_quantile must be in (0, 1], got ", *o.threshold_quantile);
    FL_CHECK_VALUE(o.threshold_max >= 1.0, op, "threshold_max must be >= 1, got ", o.threshold_max);
    p.x0_mode = X0Mode::kThreshold;
    p.threshold_quantile = *o.threshold_quantile;
    p.threshold_max = static_cast<float>(o.threshold_max);
  }
  return p;
}

// Caller's noise or Philox (seed, offset), the latter optionally read from a device tensor.
void check_noise(const char* op, const at::Tensor& sample, const std::optional<at::Tensor>& noise,
                 const std::optional<at::Tensor>& seed_offset, SamplerStepParams& p, int64_t seed, int64_t offset) {
  if (noise) check_like_sample(op, *noise, sample, "noise");
  if (seed_offset) {
    FL_CHECK(seed_offset->device() == sample.device(), op, "seed_offset and sample must be on the same device, got ",
             seed_offset->device(), " and ", sample.device());
    FL_CHECK_TYPE(seed_offset->scalar_type() == at::kLong, op, "seed_offset must be torch.int64, got ",
                  python_dtype(seed_offset->scalar_type()));
    FL_CHECK_VALUE(seed_offset->dim() == 1 && seed_offset->size(0) == 2, op,
                   "seed_offset must be [2] (seed, offset), got shape ", seed_offset->sizes());
    FL_CHECK_VALUE(sample.is_cuda() || sample.is_meta(), op,
                   "seed_offset is for CUDA graphs; on the CPU pass seed and offset");
  }
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
}

void check_schedule_value(const char* op, bool ok, const char* name, const char* expected, double value) {
  FL_CHECK_VALUE(ok, op, name, " must be ", expected, ", got ", value);
}

// A checked step: params with folded coefficients, the outputs, and the contiguous inputs the
// params point into (kept alive while the kernel runs).
struct Step {
  SamplerStepParams p;
  at::Tensor model_output, sample, noise;
  at::Tensor prev[kMaxHistory];
  at::Tensor out, x0;
  std::optional<at::Tensor> seed_offset;  // read on the device when no noise tensor is given
  std::optional<at::MemoryFormat> relayout;  // outputs computed contiguous, returned in this layout
};

// The layout of the outputs: channels_last (2-D or 3-D) when the sample is and every tensor argument shares
// its strides, as torch's elementwise ops give; contiguous otherwise. The fake kernels (fastlatent/ops/
// sampler_steps.py, _outputs) apply the same rule to the same arguments.
std::optional<at::MemoryFormat> channels_last_layout(const at::Tensor& sample,
                                                     std::initializer_list<const at::Tensor*> others) {
  if (sample.is_contiguous()) return std::nullopt;
  std::optional<at::MemoryFormat> format;
  if (sample.is_contiguous(at::MemoryFormat::ChannelsLast)) format = at::MemoryFormat::ChannelsLast;
  if (sample.is_contiguous(at::MemoryFormat::ChannelsLast3d)) format = at::MemoryFormat::ChannelsLast3d;
  if (!format) return std::nullopt;
  for (const at::Tensor* t : others)
    if (t != nullptr && t->strides() != sample.strides()) return std::nullopt;
  return format;
}

Step prepare(const SamplerStepParams& p, const at::Tensor& model_output, const at::Tensor& sample,
             const std::vector<at::Tensor>& history, const std::optional<at::Tensor>& noise,
             const std::optional<at::Tensor>& seed_offset, bool return_x0) {
  Step s;
  s.p = p;
  std::initializer_list<const at::Tensor*> others = {
      &model_output, history.size() > 0 ? &history[0] : nullptr, history.size() > 1 ? &history[1] : nullptr,
      history.size() > 2 ? &history[2] : nullptr, noise ? &*noise : nullptr};
  const std::optional<at::MemoryFormat> layout = channels_last_layout(sample, others);
  // A channels_last step runs on the caller's memory as it is (an elementwise step does not care in which
  // order a sample's N elements lie, only that every operand has the same order): no copies in, outputs in
  // that layout. Except when Philox noise is drawn: element e of the stream belongs to the logical
  // (contiguous) index e, so that step runs contiguous and its outputs are laid out afterwards.
  const bool draws = p.c.out_noise != 0.0f && !noise;
  const bool in_place = layout && !draws;
  if (layout && draws) s.relayout = layout;
  // contiguous() returns the tensor itself (no copy) when it already is
  auto operand = [&](const at::Tensor& t) { return in_place ? t : t.contiguous(); };
  auto output = [&]() {
    return in_place ? at::empty_strided(sample.sizes(), sample.strides(), sample.options())
                    : at::empty(sample.sizes(), sample.options());
  };
  s.model_output = operand(model_output);
  s.sample = operand(sample);
  s.out = output();
  s.x0 = return_x0 ? output() : at::empty({0}, sample.options());
  s.p.model_output = s.model_output.data_ptr();
  s.p.sample = s.sample.data_ptr();
  s.p.out = s.out.data_ptr();
  s.p.x0_out = return_x0 ? s.x0.data_ptr() : nullptr;
  for (int j = 0; j < kMaxHistory; ++j) {
    if (j < static_cast<int>(history.size()) && s.p.c.out_prev[j] != 0.0f) {
      s.prev[j] = operand(history[j]);
      s.p.prev[j] = s.prev[j].data_ptr();
    } else {
      s.p.c.out_prev[j] = 0.0f;
    }
  }
  if (noise && s.p.c.out_noise != 0.0f) {
    s.noise = operand(*noise);
    s.p.noise = s.noise.data_ptr();
  }
  if (seed_offset && s.p.c.out_noise != 0.0f && !noise) s.seed_offset = seed_offset->contiguous();
  return s;
}

// The outputs, laid out as channels_last_layout says.
std::tuple<at::Tensor, at::Tensor> finish(const Step& s) {
  if (!s.relayout) return {s.out, s.x0};
  return {s.out.contiguous(*s.relayout), s.p.x0_out != nullptr ? s.x0.contiguous(*s.relayout) : s.x0};
}

// Folds a named step's schedule into kernel coefficients, then prepares it.
Step prepare_form(SamplerStepParams& p, const at::Tensor& model_output, const at::Tensor& sample,
                  const std::optional<at::Tensor>& prev_x0, const std::optional<at::Tensor>& noise,
                  const std::optional<at::Tensor>& seed_offset, bool return_x0, const StepForm& form) {
  torch_glue::check_status(fold(form, p.x0_mode, return_x0, p.c));
  std::vector<at::Tensor> history;
  if (prev_x0) history.push_back(*prev_x0);
  return prepare(p, model_output, sample, history, noise, seed_offset, return_x0);
}

std::tuple<at::Tensor, at::Tensor> run_cpu(Step s) {
  torch_glue::check_status(run_sampler_step_cpu(s.p));
  return finish(s);
}

#ifdef FL_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> run_cuda(Step s) {
  const c10::cuda::CUDAGuard guard(s.sample.device());
  if (s.seed_offset) s.p.seed_offset = s.seed_offset->data_ptr<int64_t>();
  const at::Tensor workspace = at::empty({static_cast<int64_t>(sampler_step_cuda_workspace_bytes(s.p))},
                                         s.sample.options().dtype(at::kByte));
  s.p.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(launch_sampler_step_cuda(s.p, c10::cuda::getCurrentCUDAStream()));
  return finish(s);
}
#endif

Options options(std::optional<double> guidance_scale, double guidance_rescale, std::optional<double> clip_x0,
                std::optional<double> threshold_quantile, double threshold_max) {
  return Options{guidance_scale, guidance_rescale, clip_x0, threshold_quantile, threshold_max};
}

// alpha_bar_t = 0 (the first step of a zero-terminal-SNR schedule) is defined for every prediction
// but epsilon (x0 = (x - sigma eps) / alpha).
void check_alpha_bars(const char* op, double alpha_bar_t, double alpha_bar_prev, Prediction prediction) {
  if (prediction == Prediction::kEpsilon)
    check_schedule_value(op, alpha_bar_t > 0.0 && alpha_bar_t < 1.0, "alpha_bar_t", "in (0, 1)", alpha_bar_t);
  else
    check_schedule_value(op, alpha_bar_t >= 0.0 && alpha_bar_t < 1.0, "alpha_bar_t",
                         "in [0, 1) (in (0, 1) for prediction \"epsilon\")", alpha_bar_t);
  FL_CHECK_VALUE(alpha_bar_prev >= alpha_bar_t && alpha_bar_prev <= 1.0, op,
                 "alpha_bar_prev must be in [alpha_bar_t, 1] = [", alpha_bar_t, ", 1], got ", alpha_bar_prev);
}

Step plan_ddpm_step(const at::Tensor& model_output, const at::Tensor& sample, double alpha_bar_t, double alpha_bar_prev,
                    std::string_view prediction, std::optional<double> guidance_scale, double guidance_rescale,
                    std::optional<double> clip_x0, std::optional<double> threshold_quantile, double threshold_max,
                    const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                    const std::optional<at::Tensor>& seed_offset, bool return_x0) {
  constexpr const char* kOp = "ddpm_step";
  SamplerStepParams p = check_common(kOp, model_output, sample,
                                     options(guidance_scale, guidance_rescale, clip_x0, threshold_quantile,
                                             threshold_max));
  const Prediction pred = parse_prediction(kOp, "prediction", prediction);
  check_alpha_bars(kOp, alpha_bar_t, alpha_bar_prev, pred);
  check_noise(kOp, sample, noise, seed_offset, p, seed, offset);
  return prepare_form(p, model_output, sample, std::nullopt, noise, seed_offset, return_x0,
                      ddpm_form(alpha_bar_t, alpha_bar_prev, pred));
}

Step plan_ddim_step(const at::Tensor& model_output, const at::Tensor& sample, double alpha_bar_t, double alpha_bar_prev,
                    double eta, std::string_view prediction, bool use_clipped_model_output,
                    std::optional<double> guidance_scale, double guidance_rescale, std::optional<double> clip_x0,
                    std::optional<double> threshold_quantile, double threshold_max,
                    const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                    const std::optional<at::Tensor>& seed_offset, bool return_x0) {
  constexpr const char* kOp = "ddim_step";
  SamplerStepParams p = check_common(kOp, model_output, sample,
                                     options(guidance_scale, guidance_rescale, clip_x0, threshold_quantile,
                                             threshold_max));
  const Prediction pred = parse_prediction(kOp, "prediction", prediction);
  check_alpha_bars(kOp, alpha_bar_t, alpha_bar_prev, pred);
  check_schedule_value(kOp, eta >= 0.0 && std::isfinite(eta), "eta", ">= 0", eta);
  check_noise(kOp, sample, noise, seed_offset, p, seed, offset);
  return prepare_form(p, model_output, sample, std::nullopt, noise, seed_offset, return_x0,
                      ddim_form(alpha_bar_t, alpha_bar_prev, eta, pred, use_clipped_model_output));
}

Step plan_euler_step(const at::Tensor& model_output, const at::Tensor& sample, double sigma, double sigma_next,
                     std::string_view prediction, std::optional<double> guidance_scale, double guidance_rescale,
                     std::optional<double> clip_x0, std::optional<double> threshold_quantile, double threshold_max,
                     bool return_x0) {
  constexpr const char* kOp = "euler_step";
  SamplerStepParams p = check_common(kOp, model_output, sample,
                                     options(guidance_scale, guidance_rescale, clip_x0, threshold_quantile,
                                             threshold_max));
  const Prediction pred = parse_prediction(kOp, "prediction", prediction);
  check_schedule_value(kOp, sigma > 0.0 && std::isfinite(sigma), "sigma", "> 0 and finite", sigma);
  check_schedule_value(kOp, sigma_next >= 0.0 && std::isfinite(sigma_next), "sigma_next", ">= 0 and finite",
                       sigma_next);
  if (pred == Prediction::kFlow) {
    check_schedule_value(kOp, sigma <= 1.0, "sigma", "in (0, 1] for prediction \"flow\"", sigma);
    check_schedule_value(kOp, sigma_next <= 1.0, "sigma_next", "in [0, 1] for prediction \"flow\"", sigma_next);
  }
  return prepare_form(p, model_output, sample, std::nullopt, std::nullopt, std::nullopt, return_x0,
                      euler_form(sigma, sigma_next, pred));
}

Step plan_dpmpp_2m_step(const at::Tensor& model_output, const at::Tensor& sample,
                        const std::optional<at::Tensor>& prev_x0, double alpha_t, double sigma_t, double alpha_next,
                        double sigma_next, double alpha_prev, double sigma_prev, std::string_view prediction,
                        std::optional<double> guidance_scale, double guidance_rescale, std::optional<double> clip_x0,
                        std::optional<double> threshold_quantile, double threshold_max) {
  constexpr const char* kOp = "dpmpp_2m_step";
  SamplerStepParams p = check_common(kOp, model_output, sample,
                                     options(guidance_scale, guidance_rescale, clip_x0, threshold_quantile,
                                             threshold_max));
  const Prediction pred = parse_prediction(kOp, "prediction", prediction);
  if (prev_x0) check_like_sample(kOp, *prev_x0, sample, "prev_x0");
  check_schedule_value(kOp, alpha_t > 0.0 && std::isfinite(alpha_t), "alpha_t", "> 0", alpha_t);
  check_schedule_value(kOp, sigma_t > 0.0 && std::isfinite(sigma_t), "sigma_t", "> 0", sigma_t);
  check_schedule_value(kOp, alpha_next > 0.0 && std::isfinite(alpha_next), "alpha_next", "> 0", alpha_next);
  check_schedule_value(kOp, sigma_next >= 0.0 && std::isfinite(sigma_next), "sigma_next", ">= 0", sigma_next);
  if (prev_x0) {
    check_schedule_value(kOp, alpha_prev > 0.0 && std::isfinite(alpha_prev), "alpha_prev", "> 0", alpha_prev);
    check_schedule_value(kOp, sigma_prev > 0.0 && std::isfinite(sigma_prev), "sigma_prev", "> 0", sigma_prev);
    FL_CHECK_VALUE(sigma_next > 0.0, kOp,
                   "a second-order step (prev_x0 given) to sigma_next = 0 is undefined: take the last step "
                   "first-order (prev_x0=None)");
    FL_CHECK_VALUE(alpha_prev * sigma_t != alpha_t * sigma_prev, kOp,
                   "the previous step must be at another noise level than the current one (alpha_prev / sigma_prev "
                   "== alpha_t / sigma_t)");
  }
  return prepare_form(p, model_output, sample, prev_x0, std::nullopt, std::nullopt, true,
                      dpmpp_2m_form(alpha_t, sigma_t, alpha_next, sigma_next, alpha_prev, sigma_prev,
                                    prev_x0.has_value(), pred));
}

Step plan_convert_prediction(const at::Tensor& model_output, const at::Tensor& sample, double alpha_t, double sigma_t,
                             std::string_view source, std::string_view target, std::optional<double> guidance_scale,
                             double guidance_rescale) {
  constexpr const char* kOp = "convert_prediction";
  SamplerStepParams p = check_common(kOp, model_output, sample,
                                     options(guidance_scale, guidance_rescale, std::nullopt, std::nullopt, 1.0));
  const Prediction from = parse_prediction(kOp, "source", source);
  const Prediction to = parse_prediction(kOp, "target", target);
  check_schedule_value(kOp, alpha_t > 0.0 && std::isfinite(alpha_t), "alpha_t", "> 0", alpha_t);
  check_schedule_value(kOp, sigma_t > 0.0 && std::isfinite(sigma_t), "sigma_t", "> 0", sigma_t);
  // out = a x + b m: a step whose only term is "eps" with eps := the target form.
  StepForm form;
  form.conv = conversion(from, alpha_t, sigma_t);
  form.conv.eps = conversion_target(form.conv, to);
  form.a_eps = 1.0;
  return prepare_form(p, model_output, sample, std::nullopt, std::nullopt, std::nullopt, false, form);
}

Step plan_sampler_step( const at::Tensor& model_output, const at::Tensor& sample, double x0_x, double x0_m,
                       double out_x, double out_m, double out_x0, at::TensorList history,
                       at::ArrayRef<double> out_history, double out_noise, std::optional<double> guidance_scale,
                       double guidance_rescale, std::optional<double> clip_x0, std::optional<double> threshold_quantile,
                       double threshold_max, const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                       const std::optional<at::Tensor>& seed_offset, bool return_x0) {
  constexpr const char* kOp = "sampler_step";
  SamplerStepParams p = check_common(kOp, model_output, sample,
                                     options(guidance_scale, guidance_rescale, clip_x0, threshold_quantile,
                                             threshold_max));
  FL_CHECK_VALUE(history.size() <= static_cast<size_t>(kMaxHistory), kOp, "history takes at most ", kMaxHistory,
                 " tensors, got ", history.size());
  FL_CHECK_VALUE(out_history.size() == history.size(), kOp, "out_history must have one coefficient per history "
                 "tensor (", history.size(), "), got ", out_history.size());
  std::vector<at::Tensor> kept(history.begin(), history.end());
  for (const at::Tensor& h : kept) check_like_sample(kOp, h, sample, "history tensors");
  const double values[] = {x0_x, x0_m, out_x, out_m, out_x0, out_noise};
  const char* names[] = {"x0_x", "x0_m", "out_x", "out_m", "out_x0", "out_noise"};
  for (int i = 0; i < 6; ++i) check_schedule_value(kOp, std::isfinite(values[i]), names[i], "finite", values[i]);
  for (double v : out_history) check_schedule_value(kOp, std::isfinite(v), "out_history", "finite", v);
  check_noise(kOp, sample, noise, seed_offset, p, seed, offset);
  p.c.x0_x = static_cast<float>(x0_x);
  p.c.x0_m = static_cast<float>(x0_m);
  p.c.out_x = static_cast<float>(out_x);
  p.c.out_m = static_cast<float>(out_m);
  p.c.out_x0 = static_cast<float>(out_x0);
  p.c.out_noise = static_cast<float>(out_noise);
  for (size_t j = 0; j < out_history.size(); ++j) p.c.out_prev[j] = static_cast<float>(out_history[j]);
  return prepare(p, model_output, sample, kept, noise, seed_offset, return_x0);
}

// The per-key entry points, <op>_cpu and <op>_cuda: the op's plan (checks and coefficients, shared by
// both keys), then that key's kernel. Six ops share one kernel, so the pair is generated from each
// plan's signature rather than written out twelve times.
template <auto kPlan, typename Signature = decltype(kPlan)>
struct PerKey;

// The direct lane's conditions (direct_steps.h). A plain tensor's dispatch keys are exactly those a dense
// tensor of its backend is created with: the backend's, its autocast key, and (unless it is an inference
// tensor) its autograd keys. Anything more (Python, functorch wrappers, conjugate/negative views, sparse or
// nested layouts) and the dispatcher has work to do first.
bool plain_tensor(const at::Tensor& t) {
  c10::DispatchKey dense;
  c10::BackendComponent backend;
  switch (t.device().type()) {
    case c10::DeviceType::CPU:
      dense = c10::DispatchKey::CPU;
      backend = c10::BackendComponent::CPUBit;
      break;
#ifdef FL_WITH_CUDA
    case c10::DeviceType::CUDA:
      dense = c10::DispatchKey::CUDA;
      backend = c10::BackendComponent::CUDABit;
      break;
#endif
    default:
      return false;
  }
  const c10::DispatchKeySet inference = c10::DispatchKeySet(dense) | c10::getAutocastRelatedKeySetFromBackend(backend);
  const c10::DispatchKeySet keys = t.key_set();
  // a tensor that requires grad, with grad mode on: the op's outputs would carry the autograd fallback's
  // grad_fn (backward raises), which only the dispatcher attaches
  if (t.requires_grad() && at::GradMode::is_enabled()) return false;
  return keys == inference || keys == (inference | c10::getAutogradRelatedKeySetFromBackend(backend));
}

bool plain_argument(const at::Tensor& t) { return plain_tensor(t); }
bool plain_argument(const std::optional<at::Tensor>& t) { return !t || plain_tensor(*t); }
bool plain_argument(at::TensorList ts) {
  for (const at::Tensor& t : ts)
    if (!plain_tensor(t)) return false;
  return true;
}
template <typename T>
bool plain_argument(const T&) {
  return true;
}

bool on_cuda(const at::Tensor& t) { return t.is_cuda(); }
bool on_cuda(const std::optional<at::Tensor>& t) { return t && t->is_cuda(); }
bool on_cuda(at::TensorList ts) {
  for (const at::Tensor& t : ts)
    if (t.is_cuda()) return true;
  return false;
}
template <typename T>
bool on_cuda(const T&) {
  return false;
}

// The thread's included dispatch keys are the usual two: no Python dispatch mode (TorchDispatchMode,
// FakeTensorMode), functorch transform or functionalization is active.
bool plain_dispatch_state() {
  const c10::DispatchKeySet usual{c10::DispatchKey::BackendSelect, c10::DispatchKey::ADInplaceOrView};
  return (c10::impl::tls_local_dispatch_key_set().included_ - usual).empty();
}

template <auto kPlan, typename... Args>
struct PerKey<kPlan, Step (*)(Args...)> {
  static std::tuple<at::Tensor, at::Tensor> cpu(Args... args) { return run_cpu(kPlan(args...)); }
#ifdef FL_WITH_CUDA
  static std::tuple<at::Tensor, at::Tensor> cuda(Args... args) { return run_cuda(kPlan(args...)); }
#endif
  // The kernel the dispatcher would pick (CUDA when any tensor is on a CUDA device, as its backend key
  // outranks the CPU's), under the op's name in the profiler; nullopt outside the lane's conditions.
  static direct::StepResult direct(const char* name, Args... args) {
    if (!plain_dispatch_state() || !(plain_argument(args) && ...)) return std::nullopt;
    RECORD_FUNCTION(name, c10::ArrayRef<const c10::IValue>{});
    if ((on_cuda(args) || ...)) {
#ifdef FL_WITH_CUDA
      return cuda(args...);
#else
      return std::nullopt;  // the op's CUDA registration says this build has no CUDA kernels
#endif
    }
    return cpu(args...);
  }
};

// convert_prediction returns the converted tensor alone.
at::Tensor convert_prediction_cpu(const at::Tensor& model_output, const at::Tensor& sample, double alpha_t,
                                  double sigma_t, std::string_view source, std::string_view target,
                                  std::optional<double> guidance_scale, double guidance_rescale) {
  return std::get<0>(run_cpu(plan_convert_prediction(model_output, sample, alpha_t, sigma_t, source, target,
                                                     guidance_scale, guidance_rescale)));
}

#ifdef FL_WITH_CUDA
at::Tensor convert_prediction_cuda(const at::Tensor& model_output, const at::Tensor& sample, double alpha_t,
                                   double sigma_t, std::string_view source, std::string_view target,
                                   std::optional<double> guidance_scale, double guidance_rescale) {
  return std::get<0>(run_cuda(plan_convert_prediction(model_output, sample, alpha_t, sigma_t, source, target,
                                                      guidance_scale, guidance_rescale)));
}
#endif

}  // namespace

// The direct lanes run the CPU kernels, which the emulated module (csrc/emu/binding_shim.h) does not have.
#ifndef FL_EMU_BINDINGS
namespace direct {

StepResult ddim_step(const at::Tensor& model_output, const at::Tensor& sample, double alpha_bar_t,
                     double alpha_bar_prev, double eta, std::string_view prediction, bool use_clipped_model_output,
                     std::optional<double> guidance_scale, double guidance_rescale, std::optional<double> clip_x0,
                     std::optional<double> threshold_quantile, double threshold_max,
                     const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                     const std::optional<at::Tensor>& seed_offset, bool return_x0) {
  return PerKey<&plan_ddim_step>::direct("fastlatent::ddim_step", model_output, sample, alpha_bar_t, alpha_bar_prev,
                                          eta, prediction, use_clipped_model_output, guidance_scale,
                                          guidance_rescale, clip_x0, threshold_quantile, threshold_max, noise, seed,
                                          offset, seed_offset, return_x0);
}

StepResult euler_step(const at::Tensor& model_output, const at::Tensor& sample, double sigma, double sigma_next,
                      std::string_view prediction, std::optional<double> guidance_scale, double guidance_rescale,
                      std::optional<double> clip_x0, std::optional<double> threshold_quantile, double threshold_max,
                      bool return_x0) {
  return PerKey<&plan_euler_step>::direct("fastlatent::euler_step", model_output, sample, sigma, sigma_next,
                                           prediction, guidance_scale, guidance_rescale, clip_x0,
                                           threshold_quantile, threshold_max, return_x0);
}

StepResult sampler_step(const at::Tensor& model_output, const at::Tensor& sample, double x0_x, double x0_m,
                        double out_x, double out_m, double out_x0, const std::vector<at::Tensor>& history,
                        const std::vector<double>& out_history, double out_noise,
                        std::optional<double> guidance_scale, double guidance_rescale, std::optional<double> clip_x0,
                        std::optional<double> threshold_quantile, double threshold_max,
                        const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                        const std::optional<at::Tensor>& seed_offset, bool return_x0) {
  return PerKey<&plan_sampler_step>::direct("fastlatent::sampler_step", model_output, sample, x0_x, x0_m, out_x,
                                             out_m, out_x0, at::TensorList(history), at::ArrayRef<double>(out_history),
                                             out_noise, guidance_scale, guidance_rescale, clip_x0, threshold_quantile,
                                             threshold_max, noise, seed, offset, seed_offset, return_x0);
}

std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> sampler_step_keeping_model_output(
    const at::Tensor& model_output, const at::Tensor& sample, double x0_x, double x0_m, double out_x, double out_m,
    double out_x0, bool return_x0) {
  if (!plain_dispatch_state() || !plain_tensor(model_output) || !plain_tensor(sample)) return std::nullopt;
  if (model_output.is_cuda() || sample.is_cuda()) return std::nullopt;
  RECORD_FUNCTION("fastlatent::sampler_step", c10::ArrayRef<const c10::IValue>{});
  Step s = plan_sampler_step(model_output, sample, x0_x, x0_m, out_x, out_m, out_x0, {}, {}, 0.0, std::nullopt, 0.0,
                             std::nullopt, std::nullopt, 1.0, std::nullopt, 0, 0, std::nullopt, return_x0);
  // the layout of the model output the kernel reads (the caller's channels_last tensor, or contiguous)
  at::Tensor copy = at::empty_strided(s.model_output.sizes(), s.model_output.strides(), s.model_output.options());
  s.p.model_output_copy = copy.data_ptr();
  auto [out, x0] = run_cpu(std::move(s));
  return std::make_tuple(std::move(out), std::move(x0), std::move(copy));
}

}  // namespace direct
#endif  // FL_EMU_BINDINGS
}  // namespace fastlatent

#define FL_GUIDANCE_ARGS                                                                            \
  "float? guidance_scale=None, float guidance_rescale=0.0, float? clip_x0=None, "                   \
  "float? threshold_quantile=None, float threshold_max=1.0"
#define FL_NOISE_ARGS "Tensor? noise=None, int seed=0, int offset=0, Tensor? seed_offset=None"

TORCH_LIBRARY_FRAGMENT(fastlatent, m) {
  m.def("ddpm_step(Tensor model_output, Tensor sample, float alpha_bar_t, float alpha_bar_prev, "
        "str prediction=\"epsilon\", " FL_GUIDANCE_ARGS ", " FL_NOISE_ARGS ", bool return_x0=True) "
        "-> (Tensor prev_sample, Tensor pred_x0)");
  m.def("ddim_step(Tensor model_output, Tensor sample, float alpha_bar_t, float alpha_bar_prev, float eta=0.0, "
        "str prediction=\"epsilon\", bool use_clipped_model_output=False, " FL_GUIDANCE_ARGS ", " FL_NOISE_ARGS
        ", bool return_x0=True) -> (Tensor prev_sample, Tensor pred_x0)");
  m.def("euler_step(Tensor model_output, Tensor sample, float sigma, float sigma_next, "
        "str prediction=\"epsilon\", " FL_GUIDANCE_ARGS ", bool return_x0=True) "
        "-> (Tensor prev_sample, Tensor pred_x0)");
  m.def("dpmpp_2m_step(Tensor model_output, Tensor sample, Tensor? prev_x0, float alpha_t, float sigma_t, "
        "float alpha_next, float sigma_next, float alpha_prev=1.0, float sigma_prev=1.0, "
        "str prediction=\"epsilon\", " FL_GUIDANCE_ARGS ") -> (Tensor prev_sample, Tensor pred_x0)");
  m.def("sampler_step(Tensor model_output, Tensor sample, float x0_x, float x0_m, float out_x, float out_m, "
        "float out_x0, Tensor[] history, float[] out_history, float out_noise=0.0, " FL_GUIDANCE_ARGS ", "
        FL_NOISE_ARGS ", bool return_x0=True) -> (Tensor prev_sample, Tensor pred_x0)");
  m.def("convert_prediction(Tensor model_output, Tensor sample, float alpha_t, float sigma_t, str source, "
        "str target, float? guidance_scale=None, float guidance_rescale=0.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlatent, CPU, m) {
  m.impl("ddpm_step", &fastlatent::PerKey<&fastlatent::plan_ddpm_step>::cpu);
  m.impl("ddim_step", &fastlatent::PerKey<&fastlatent::plan_ddim_step>::cpu);
  m.impl("euler_step", &fastlatent::PerKey<&fastlatent::plan_euler_step>::cpu);
  m.impl("dpmpp_2m_step", &fastlatent::PerKey<&fastlatent::plan_dpmpp_2m_step>::cpu);
  m.impl("convert_prediction", &fastlatent::convert_prediction_cpu);
  m.impl("sampler_step", &fastlatent::PerKey<&fastlatent::plan_sampler_step>::cpu);
}

TORCH_LIBRARY_IMPL(fastlatent, CUDA, m) {
  FL_REGISTER_CUDA(m, "ddpm_step", &fastlatent::PerKey<&fastlatent::plan_ddpm_step>::cuda);
  FL_REGISTER_CUDA(m, "ddim_step", &fastlatent::PerKey<&fastlatent::plan_ddim_step>::cuda);
  FL_REGISTER_CUDA(m, "euler_step", &fastlatent::PerKey<&fastlatent::plan_euler_step>::cuda);
  FL_REGISTER_CUDA(m, "dpmpp_2m_step", &fastlatent::PerKey<&fastlatent::plan_dpmpp_2m_step>::cuda);
  FL_REGISTER_CUDA(m, "convert_prediction", &fastlatent::convert_prediction_cuda);
  FL_REGISTER_CUDA(m, "sampler_step", &fastlatent::PerKey<&fastlatent::plan_sampler_step>::cuda);
}
