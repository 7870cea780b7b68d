// Fused diffusion sampler steps: DDPM, DDIM, Euler (EDM/Karras sigmas and flow matching),
// DPM-Solver++(2M), and conversions between eps / v / x0 / velocity parameterisations.
//
// Math. The current sample is x = alpha x0 + sigma eps (VP: alpha^2 + sigma^2 = 1; EDM/Karras
// sigma space: alpha = 1; rectified flow: alpha = 1 - sigma). Every parameterisation of the model
// output m is linear in (x, m), with k = 1 / sqrt(alpha^2 + sigma^2):
//   epsilon       x0 = (x - sigma m) / alpha                 eps = m
//   sample        x0 = m                                     eps = (x - alpha m) / sigma
//   v_prediction  x0 = alpha k^2 x - sigma k m               eps = sigma k^2 x + alpha k m
//   flow          x0 = (x - sigma m) / (alpha + sigma)       eps = (x + alpha m) / (alpha + sigma)
// and every step is linear in (x, x0', eps, previous x0, noise z), so one kernel computes
//   m   = u + g (c - u)                        guidance: u, c the [uncond; cond] halves of the batch
//   m  *= phi std(c) / std(m) + (1 - phi)      guidance rescale (Lin et al. 2023), per sample
//   x0  = x0_x x + x0_m m                      the parameterisation, folded into two numbers
//   x0' = clamp(x0, -r, r)  or  clamp(x0, -s, s) / s,  s = clamp(quantile(|x0|, p), 1, s_max)
//   out = out_x x + out_m m + out_x0 x0' + sum_j out_prev[j] h_j + out_noise z
// with up to kMaxHistory earlier tensors h_j (previous x0 or model outputs of multistep solvers).
// The host folds each step's schedule into those coefficients in double precision (the *_form
// and fold functions below, or the caller's own for the generic sampler_step op); the kernels
// never see a schedule.
//
// Layout: every tensor is viewed as [B, N] (B the batch, N all other dims), contiguous, or all in one
// channels_last layout (the binding then passes the memory as it is: the step is elementwise, and only Philox
// noise, drawn by logical index, needs the contiguous order);
// model_output is [2B, N] with guidance (unconditional rows first, as diffusers pipelines stack
// them). Math in fp32 for fp32/fp16/bf16 storage. Noise: Philox4x32-10 (philox.h), element
// e = b * N + i of the output takes normal_at(seed, offset, e), the same on CPU and CUDA.
//
// Thread mapping. CPU: OpenMP over 2048-element chunks of one sample, each updated in one
// vectorised pass (fp16/bf16 and guided model outputs staged through fp32 scratch). CUDA:
// grid-stride loop over 16-byte vectors (4 fp32 or 8 fp16/bf16 elements) with 64-bit indices
// when N is a multiple of the vector width and every pointer is 16-byte aligned, one element per
// iteration otherwise.
//
// Per-sample statistics (only when asked for): guidance rescale needs std(c) and std(m), a
// separate reduction pass over the model output before the step (a fused single pass would need
// a grid-wide barrier before any sample could be written): fixed chunks, double partial sums,
// summed in chunk order, so the result is deterministic. Dynamic thresholding (Imagen) needs
// the p-quantile of |x0| per sample, exactly as torch.quantile (linear interpolation between
// order statistics): the CPU selects with nth_element, CUDA materialises |x0| in fp32 and runs an
// exact 4 x 8-bit radix select per sample in one block. NaN in, NaN out, as torch: a NaN in a
// sample's x0 makes its threshold NaN (torch.quantile), and a NaN in the model output makes the
// rescale factor NaN (torch.std). Everything is deterministic.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "common.h"
#include "philox.h"

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fastlatent {

enum class Prediction : int { kEpsilon = 0, kVPrediction = 1, kSample = 2, kFlow = 3 };
enum class X0Mode : int { kNone = 0, kClip = 1, kThreshold = 2 };

constexpr int kMaxHistory = 3;

// out = out_x x + out_m m + out_x0 x0' + sum_j out_prev[j] h_j + out_noise z, x0 = x0_x x + x0_m m.
struct StepCoefficients {
  float x0_x = 0, x0_m = 0;
  float out_x = 0, out_m = 0, out_x0 = 0, out_noise = 0;
  float out_prev[kMaxHistory] = {0, 0, 0};
};

struct SamplerStepParams {
  const void* model_output = nullptr;  // [G * B, N], G = 2 with guidance ([uncond; cond]), else 1
  const void* sample = nullptr;        // [B, N]
  const void* prev[kMaxHistory] = {nullptr, nullptr, nullptr};  // [B, N] each or null: earlier x0 or model
                                       // outputs (multistep solvers); null where out_prev[j] is 0
  const void* noise = nullptr;         // [B, N] or null: caller's noise, used instead of Philox
  void* out = nullptr;                 // [B, N]
  void* x0_out = nullptr;              // [B, N] or null: the (clipped/thresholded) x0
  void* model_output_copy = nullptr;   // CPU only, unguided: [B, N] or null, a copy of model_output written
                                       // while its chunk is in cache (Heun stores the model output it stepped
                                       // with: the copy's pass costs a write, not a read and a write)
  int64_t batch = 0;                   // B
  int64_t n = 0;                       // N, elements per sample
  DType dtype = DType::kFloat32;       // of every tensor above
  bool guided = false;
  float guidance_scale = 1.0f;
  float guidance_rescale = 0.0f;       // phi in [0, 1]; > 0 needs guided and N >= 2
  X0Mode x0_mode = X0Mode::kNone;
  float clip = 1.0f;                   // kClip: x0 clamped to [-clip, clip]
  double threshold_quantile = 0.995;   // kThreshold: p in (0, 1]
  float threshold_max = 1.0f;          // kThreshold: s_max >= 1
  StepCoefficients c;
  uint64_t seed = 0;                   // Philox key, used when out_noise != 0 and noise is null
  uint64_t offset = 0;                 // Philox counter high words
  const int64_t* seed_offset = nullptr;  // CUDA only: device {seed, offset}, read at run time
                                         // instead of seed/offset (for CUDA graph replays)
  void* workspace = nullptr;           // CUDA only: sampler_step_cuda_workspace_bytes() bytes
};

Status run_sampler_step_cpu(const SamplerStepParams& params);

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
cudaError_t launch_sampler_step_cuda(const SamplerStepParams& params, cudaStream_t stream);
#endif

// ------------------------------------------------------------------ shared element math

// The update of one element, shared by the CPU and CUDA kernels so both round the same way.
// history = sum_j out_prev[j] h_j, accumulated in j order by the caller (in its own vectorised loop on the
// CPU: a per-element loop over the history slots here kept the compiler from vectorising the step).
struct StepElement {
  float out;
  float x0;
};

FL_HOST_DEVICE StepElement step_element(const StepCoefficients& c, X0Mode mode, float clip, float thresh,
                                        float x, float m, float history, float z) {
  float x0 = c.x0_x * x + c.x0_m * m;
  // clamp(x0, -r, r), NaN propagating as torch.clamp, written as two selects whose NaN operand comes second
  // (what x86's maxps/minps return for NaN: one instruction each where a nested ternary took five)
  const float r = mode == X0Mode::kThreshold ? thresh : clip;
  if (mode != X0Mode::kNone) {
    x0 = -r > x0 ? -r : x0;
    x0 = r < x0 ? r : x0;
  }
  if (mode == X0Mode::kThreshold) x0 = x0 / thresh;
  const float out = c.out_x * x + c.out_m * m + c.out_x0 * x0 + history + c.out_noise * z;
  return {out, x0};
}

// step_element for a step without an out_x0 x0' term (x0 mode kNone, out_x0 == 0): the CPU kernel's loop for
// such steps and the CUDA kernel both skip the term, so an infinite x0 does not turn the output into NaN
// (0 * inf); the step's own terms decide, as in diffusers. Same bits as step_element for finite x0: t + 0 * x0
// equals t, and the sum is never -0 once `+ history` (never -0) is added. z is 0 when the step has no noise
// (out_noise * 0 adds +-0 to a sum that is not -0).
FL_HOST_DEVICE StepElement step_element_without_x0_term(const StepCoefficients& c, float x, float m, float history,
                                                        float z) {
  const float out = c.out_x * x + c.out_m * m + history + c.out_noise * z;
  return {out, c.x0_x * x + c.x0_m * m};
}

// True when a step has an out_x0 x0' term (the general step_element).
FL_HOST_DEVICE bool has_x0_term(const StepCoefficients& c, X0Mode mode) {
  return mode != X0Mode::kNone || c.out_x0 != 0.0f;
}

// torch.quantile's linear interpolation between the order statistics lo <= hi (torch.lerp).
FL_HOST_DEVICE float quantile_lerp(float lo, float hi, float weight) {
  return weight < 0.5f ? lo + weight * (hi - lo) : hi - (hi - lo) * (1.0f - weight);
}

// Per-sample guidance-rescale factor from the sums of c and of the guided m (double).
FL_HOST_DEVICE float rescale_factor(double sum_c, double sumsq_c, double sum_m, double sumsq_m, int64_t n,
                                    float phi) {
  const double var_c = (sumsq_c - sum_c * sum_c / n) / (n - 1);
  const double var_m = (sumsq_m - sum_m * sum_m / n) / (n - 1);
  // rounding can make a variance slightly negative; NaN passes through (NaN in, NaN out)
  const double ratio = sqrt(var_c < 0 ? 0.0 : var_c) / sqrt(var_m < 0 ? 0.0 : var_m);
  return static_cast<float>(phi * ratio + (1.0 - phi));
}

// ------------------------------------------------------------------ host-side step forms

// a x + b m over the current sample and the model output.
struct LinearForm {
  double x = 0, m = 0;
};

// How x0 and eps follow from (x, m) for a parameterisation at noise level (alpha, sigma).
struct Conversion {
  LinearForm x0, eps;
  double alpha = 1, sigma = 0;
};

inline Conversion conversion(Prediction prediction, double alpha, double sigma) {
  Conversion c;
  c.alpha = alpha;
  c.sigma = sigma;
  switch (prediction) {
    case Prediction::kEpsilon:
      c.x0 = {1.0 / alpha, -sigma / alpha};
      c.eps = {0.0, 1.0};
      break;
    case Prediction::kSample:
      c.x0 = {0.0, 1.0};
      c.eps = {1.0 / sigma, -alpha / sigma};
      break;
    case Prediction::kVPrediction: {
      const double k = 1.0 / std::sqrt(alpha * alpha + sigma * sigma);
      c.x0 = {alpha * k * k, -sigma * k};
      c.eps = {sigma * k * k, alpha * k};
      break;
    }
    case Prediction::kFlow:
      c.x0 = {1.0 / (alpha + sigma), -sigma / (alpha + sigma)};
      c.eps = {1.0 / (alpha + sigma), alpha / (alpha + sigma)};
      break;
  }
  return c;
}

// A step before folding: out = a_x x + a_x0 x0' + a_eps eps + a_prev prev + a_noise z.
struct StepForm {
  Conversion conv;
  double a_x = 0, a_x0 = 0, a_eps = 0, a_prev = 0, a_noise = 0;
  bool eps_from_x0 = false;  // eps re-derived from the processed x0' (DDIM use_clipped_model_output)
};

// 0 * inf must stay 0: a coefficient the step does not use may be infinite (eps of a sample
// prediction at sigma = 0).
inline double times(double a, double b) { return a == 0.0 ? 0.0 : a * b; }

// Folds a step into the kernel's seven coefficients. Not finite (an invalid schedule the
// binding did not catch): an error.
inline Status fold(const StepForm& f, X0Mode mode, bool need_x0, StepCoefficients& out) {
  const Conversion& v = f.conv;
  double ox, om, ox0;
  if (mode == X0Mode::kNone) {
    ox = f.a_x + times(f.a_x0, v.x0.x) + times(f.a_eps, v.eps.x);
    om = times(f.a_x0, v.x0.m) + times(f.a_eps, v.eps.m);
    ox0 = 0.0;
  } else if (f.eps_from_x0) {
    ox = f.a_x + times(f.a_eps, 1.0 / v.sigma);
    om = 0.0;
    ox0 = f.a_x0 - times(f.a_eps, v.alpha / v.sigma);
  } else {
    ox = f.a_x + times(f.a_eps, v.eps.x);
    om = times(f.a_eps, v.eps.m);
    ox0 = f.a_x0;
  }
  const bool x0_used = mode != X0Mode::kNone || need_x0;
  const double values[] = {ox, om, ox0, f.a_prev, f.a_noise, x0_used ? v.x0.x : 0.0, x0_used ? v.x0.m : 0.0};
  for (double value : values)
    if (!std::isfinite(value)) return Status::Error("sampler step: the schedule gives non-finite coefficients");
  out.out_x = static_cast<float>(ox);
  out.out_m = static_cast<float>(om);
  out.out_x0 = static_cast<float>(ox0);
  out.out_prev[0] = static_cast<float>(f.a_prev);
  out.out_noise = static_cast<float>(f.a_noise);
  out.x0_x = x0_used ? static_cast<float>(v.x0.x) : 0.0f;
  out.x0_m = x0_used ? static_cast<float>(v.x0.m) : 0.0f;
  return Status::Ok();
}

// DDPM ancestral step (Ho et al. 2020, eq. 7; diffusers DDPMScheduler, variance "fixed_small"):
// t -> t_prev with alpha_bar_prev = 1 at the last step (no noise then).
inline StepForm ddpm_form(double alpha_bar_t, double alpha_bar_prev, Prediction prediction) {
  StepForm f;
  f.conv = conversion(prediction, std::sqrt(alpha_bar_t), std::sqrt(1.0 - alpha_bar_t));
  const double alpha_t = alpha_bar_t / alpha_bar_prev, beta_t = 1.0 - alpha_t;
  f.a_x0 = std::sqrt(alpha_bar_prev) * beta_t / (1.0 - alpha_bar_t);
  f.a_x = std::sqrt(alpha_t) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t);
  const double variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta_t;
  f.a_noise = variance > 0.0 ? std::sqrt(variance < 1e-20 ? 1e-20 : variance) : 0.0;
  return f;
}

// DDIM (Song et al. 2021, eq. 12) with eta; eta = 1 is DDPM-like noise.
inline StepForm ddim_form(double alpha_bar_t, double alpha_bar_prev, double eta, Prediction prediction,
                          bool use_clipped_model_output) {
  StepForm f;
  f.conv = conversion(prediction, std::sqrt(alpha_bar_t), std::sqrt(1.0 - alpha_bar_t));
  const double variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev);
  const double std_dev = eta * std::sqrt(variance > 0.0 ? variance : 0.0);
  const double direction = 1.0 - alpha_bar_prev - std_dev * std_dev;
  f.a_x0 = std::sqrt(alpha_bar_prev);
  f.a_eps = std::sqrt(direction > 0.0 ? direction : 0.0);
  f.a_noise = std_dev;
  f.eps_from_x0 = use_clipped_model_output;
  return f;
}

// Euler step of the probability-flow ODE dx/dsigma = (x - x0) / sigma. Prediction kFlow means
// x = (1 - sigma) x0 + sigma eps (rectified flow, dx/dsigma = velocity); the others mean
// x = x0 + sigma eps (EDM/Karras sigma space, diffusers' EulerDiscreteScheduler).
inline StepForm euler_form(double sigma, double sigma_next, Prediction prediction) {
  StepForm f;
  f.conv = conversion(prediction, prediction == Prediction::kFlow ? 1.0 - sigma : 1.0, sigma);
  const double ratio = (sigma_next - sigma) / sigma;
  f.a_x = 1.0 + ratio;
  f.a_x0 = -ratio;
  return f;
}

// DPM-Solver++(2M), midpoint form (Lu et al. 2022, alg. 2; diffusers DPMSolverMultistepScheduler):
// lambda = log(alpha / sigma), h = lambda_next - lambda_t, r = (lambda_t - lambda_prev) / h,
//   out = sigma_next / sigma_t x - alpha_next (e^-h - 1) (x0 + (x0 - prev_x0) / (2 r))
// first order (no prev_x0): the r term is dropped. sigma_next = 0 gives x0 (first order only).
inline StepForm dpmpp_2m_form(double alpha_t, double sigma_t, double alpha_next, double sigma_next,
                              double alpha_prev, double sigma_prev, bool second_order, Prediction prediction) {
  StepForm f;
  f.conv = conversion(prediction, alpha_t, sigma_t);
  const double lambda_t = std::log(alpha_t) - std::log(sigma_t);
  const double lambda_next = std::log(alpha_next) - std::log(sigma_next);  // +inf at sigma_next = 0
  const double h = lambda_next - lambda_t;
  const double decay = std::exp(-h) - 1.0;
  f.a_x = sigma_next / sigma_t;
  f.a_x0 = -alpha_next * decay;
  if (second_order) {
    const double lambda_prev = std::log(alpha_prev) - std::log(sigma_prev);
    const double half_inv_r = 0.5 * h / (lambda_t - lambda_prev);
    f.a_x0 = -alpha_next * decay * (1.0 + half_inv_r);
    f.a_prev = alpha_next * decay * half_inv_r;
  }
  return f;
}

// convert_prediction: the target parameterisation as a form over (x, m).
inline LinearForm conversion_target(const Conversion& c, Prediction target) {
  switch (target) {
    case Prediction::kEpsilon: return c.eps;
    case Prediction::kSample: return c.x0;
    case Prediction::kVPrediction: {
      const double k = 1.0 / std::sqrt(c.alpha * c.alpha + c.sigma * c.sigma);
      return {c.alpha * k * c.eps.x - c.sigma * k * c.x0.x, c.alpha * k * c.eps.m - c.sigma * k * c.x0.m};
    }
    case Prediction::kFlow: return {c.eps.x - c.x0.x, c.eps.m - c.x0.m};
  }
  return {};
}

// ------------------------------------------------------------------ workspace

// Chunks per sample of the statistics pass: a function of N only, so the summation order (and
// the result) does not depend on the device or the thread count.
inline int64_t sampler_stats_chunks(int64_t n) {
  const int64_t chunks = (n + 8191) / 8192;
  return chunks < 1 ? 1 : (chunks > 64 ? 64 : chunks);
}

inline size_t sampler_align16(size_t bytes) { return (bytes + 15) & ~static_cast<size_t>(15); }

// CUDA workspace: [B, chunks, 4] double partial sums | [B] rescale factors | [B] thresholds |
// [B, N] fp32 |x0| (thresholding only).
inline size_t sampler_step_cuda_workspace_bytes(const SamplerStepParams& p) {
  const size_t batch = static_cast<size_t>(p.batch);
  size_t bytes = sampler_align16(batch * sampler_stats_chunks(p.n) * 4 * sizeof(double)) +
                 2 * sampler_align16(batch * sizeof(float));
  if (p.x0_mode == X0Mode::kThreshold) bytes += sampler_align16(batch * static_cast<size_t>(p.n) * sizeof(float));
  return bytes;
}

}  // namespace fastlatent
