"""Fused diffusion sampler steps: one pass over the latents per step, guidance folded in.

Every step reads the model output and the current sample once and writes the next sample once
(and ``pred_x0`` when asked), with classifier-free guidance, guidance rescale and x0 clipping or
dynamic thresholding done in the same kernel. Schedule scalars are plain floats computed on the
host, so nothing in an op waits for the device. The math and kernel design are documented in
``csrc/kernels/sampler_step.h``.

Shared keyword arguments:

- ``guidance_scale``: classifier-free guidance. ``model_output`` is then ``[2B, ...]`` with the
  unconditional outputs first and the conditional ones second (as diffusers pipelines stack
  them) and the step uses ``m = u + guidance_scale * (c - u)``.
- ``guidance_rescale``: ``phi`` of Lin et al. 2023 ("Common diffusion noise schedules and sample
  steps are flawed"): ``m <- phi * m * std(c) / std(m) + (1 - phi) * m`` with per-sample
  (unbiased) standard deviations; needs guidance.
- ``clip_x0``: clamp the predicted x0 to ``[-clip_x0, clip_x0]``.
- ``threshold_quantile``, ``threshold_max``: Imagen's dynamic thresholding: per sample
  ``s = clamp(quantile(|x0|, threshold_quantile), 1, threshold_max)``, ``x0 <- clamp(x0, -s, s) / s``
  (exact quantile, as ``torch.quantile``).

Noise (DDPM, DDIM with ``eta > 0``): ``noise`` given is used as is; otherwise normals are drawn in
the kernel from Philox4x32-10 at ``(seed, offset)``, identical on the CPU and CUDA (see
``csrc/kernels/philox.h``). ``generator`` draws ``seed`` from a ``torch.Generator`` (advancing it),
so the same generator state gives the same noise. ``seed_offset`` (CUDA, an int64 ``[2]`` tensor)
is read by the kernel at run time instead, for CUDA graphs that must draw new noise per replay.

NaN in, NaN out, as the reference (and diffusers): a NaN in a sample's predicted x0 makes its dynamic
threshold NaN (``torch.quantile``), so that whole sample comes out NaN; a NaN in the model output makes
the guidance-rescale factor NaN (``torch.std``).

Autograd: the fused steps are inference-only. Given a tensor that requires grad (with grad mode on)
they raise RuntimeError instead of returning an output that silently does not backpropagate; the
functions of :mod:`fastlatent.reference.sampler_steps` are differentiable, and the patched diffusers
schedulers run diffusers' own (differentiable) step for such calls.
"""

from __future__ import annotations

import math

import torch

from fastlatent._extension import extension_available, require_device
from fastlatent.ops import _checks

PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
_SEED_HIGH = 2**63 - 1


def seed_from_generator(generator: torch.Generator | None, device: torch.device | None = None) -> int:
    """A 63-bit Philox seed drawn from ``generator`` (the default CPU generator when None).

    Advances the generator, so successive calls give new seeds and re-seeding the generator
    reproduces them. A CUDA generator costs one device sync here (never inside an op); pass a
    CPU generator to avoid it.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return int(draw.item())


def _check_inference(op, *tensors):
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"fastlatent.{op}: the fused sampler steps are inference-only (no autograd), got "
            "an input that requires grad; run the step under torch.no_grad() or on detached "
            f"tensors, or use fastlatent.reference.{op}, which is differentiable"
        )


def _check_like_sample(op, t, sample, name):
    _checks.check_same_device(op, "sample", sample, name, t)
    _checks.check_same_dtype(op, "sample", sample, name, t)
    if t.shape != sample.shape:
        raise ValueError(
            f"fastlatent.{op}: {name} must have the shape of sample {list(sample.shape)}, got {list(t.shape)}"
        )


def _check_common(
    op, model_output, sample, guidance_scale, guidance_rescale, clip_x0, threshold_quantile, threshold_max
):
    if sample.dim() < 1:
        raise ValueError(
            f"fastlatent.{op}: sample must be at least 1-D [B, ...], got shape {list(sample.shape)}"
        )
    _checks.check_float(op, "sample", sample)
    _checks.check_same_device(op, "sample", sample, "model_output", model_output)
    _checks.check_same_dtype(op, "sample", sample, "model_output", model_output)
    n = math.prod(sample.shape[1:])
    if guidance_scale is not None:
        if model_output.dim() != sample.dim() or model_output.shape[0] % 2 != 0:
            raise ValueError(
                f"fastlatent.{op}: guidance needs model_output = [uncond; cond] stacked in the batch "
                f"(an even batch of 2B), got shape {list(model_output.shape)}"
            )
        if model_output.shape[0] != 2 * sample.shape[0] or model_output.shape[1:] != sample.shape[1:]:
            raise ValueError(
                f"fastlatent.{op}: with guidance model_output must be [2B, ...] for sample "
                f"{list(sample.shape)}, got {list(model_output.shape)}"
            )
        if not math.isfinite(guidance_scale):
            raise ValueError(f"fastlatent.{op}: guidance_scale must be finite, got {guidance_scale}")
    elif model_output.shape != sample.shape:
        raise ValueError(
            f"fastlatent.{op}: model_output must have the shape of sample {list(sample.shape)} "
            f"(or [2B, ...] with guidance_scale), got {list(model_output.shape)}"
        )
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"fastlatent.{op}: guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if guidance_rescale > 0.0:
        if guidance_scale is None:
            raise ValueError(f"fastlatent.{op}: guidance_rescale needs guidance_scale")
        if n < 2:
            raise ValueError(
                f"fastlatent.{op}: guidance_rescale needs at least 2 elements per sample, got {n}"
            )
    if clip_x0 is not None and threshold_quantile is not None:
        raise ValueError(f"fastlatent.{op}: clip_x0 and threshold_quantile are exclusive, got both")
    if clip_x0 is not None and not (clip_x0 > 0.0 and math.isfinite(clip_x0)):
        raise ValueError(f"fastlatent.{op}: clip_x0 must be > 0, got {clip_x0}")
    if threshold_quantile is not None:
        if not 0.0 < threshold_quantile <= 1.0:
            raise ValueError(
                f"fastlatent.{op}: threshold_quantile must be in (0, 1], got {threshold_quantile}"
            )
        if not threshold_max >= 1.0:
            raise ValueError(f"fastlatent.{op}: threshold_max must be >= 1, got {threshold_max}")


def _check_noise(op, sample, noise, seed_offset):
    if noise is not None:
        _check_like_sample(op, noise, sample, "noise")
    if seed_offset is not None:
        if seed_offset.device != sample.device:
            raise RuntimeError(
                f"fastlatent.{op}: seed_offset and sample must be on the same device, got "
                f"{seed_offset.device} and {sample.device}"
            )
        if seed_offset.dtype != torch.int64:
            raise TypeError(f"fastlatent.{op}: seed_offset must be torch.int64, got {seed_offset.dtype}")
        if seed_offset.shape != (2,):
            raise ValueError(
                f"fastlatent.{op}: seed_offset must be [2] (seed, offset), got shape "
                f"{list(seed_offset.shape)}"
            )
        if not (sample.is_cuda or sample.is_meta):
            raise ValueError(
                f"fastlatent.{op}: seed_offset is for CUDA graphs; on the CPU pass seed and offset"
            )


def _check_value(op, ok, name, expected, value):
    if not ok:
        raise ValueError(f"fastlatent.{op}: {name} must be {expected}, got {value}")


def _check_prediction(op, name, value):
    _checks.check_choice(op, name, value, PREDICTIONS)


def _check_alpha_bars(op, alpha_bar_t, alpha_bar_prev, prediction):
    # alpha_bar_t = 0 (zero terminal SNR) is defined for every prediction but epsilon
    if prediction == "epsilon":
        _check_value(op, 0.0 < alpha_bar_t < 1.0, "alpha_bar_t", "in (0, 1)", alpha_bar_t)
    else:
        _check_value(
            op,
            0.0 <= alpha_bar_t < 1.0,
            "alpha_bar_t",
            'in [0, 1) (in (0, 1) for prediction "epsilon")',
            alpha_bar_t,
        )
    if not alpha_bar_t <= alpha_bar_prev <= 1.0:
        raise ValueError(
            f"fastlatent.{op}: alpha_bar_prev must be in [alpha_bar_t, 1] = [{alpha_bar_t}, 1], "
            f"got {alpha_bar_prev}"
        )


def check_ddpm_step_args(
    model_output,
    sample,
    alpha_bar_t,
    alpha_bar_prev,
    prediction,
    guidance_scale,
    guidance_rescale,
    clip_x0,
    threshold_quantile,
    threshold_max,
    noise,
    seed_offset,
):
    op = "ddpm_step"
    _check_common(
        op, model_output, sample, guidance_scale, guidance_rescale, clip_x0, threshold_quantile, threshold_max
    )
    _check_prediction(op, "prediction", prediction)
    _check_alpha_bars(op, alpha_bar_t, alpha_bar_prev, prediction)
    _check_noise(op, sample, noise, seed_offset)


def check_ddim_step_args(
    model_output,
    sample,
    alpha_bar_t,
    alpha_bar_prev,
    eta,
    prediction,
    guidance_scale,
    guidance_rescale,
    clip_x0,
    threshold_quantile,
    threshold_max,
    noise,
    seed_offset,
):
    op = "ddim_step"
    _check_common(
        op, model_output, sample, guidance_scale, guidance_rescale, clip_x0, threshold_quantile, threshold_max
    )
    _check_prediction(op, "prediction", prediction)
    _check_alpha_bars(op, alpha_bar_t, alpha_bar_prev, prediction)
    _check_value(op, eta >= 0.0 and math.isfinite(eta), "eta", ">= 0", eta)
    _check_noise(op, sample, noise, seed_offset)


def check_euler_step_args(
    model_output,
    sample,
    sigma,
    sigma_next,
    prediction,
    guidance_scale,
    guidance_rescale,
    clip_x0,
    threshold_quantile,
    threshold_max,
):
    op = "euler_step"
    _check_common(
        op, model_output, sample, guidance_scale, guidance_rescale, clip_x0, threshold_quantile, threshold_max
    )
    _check_prediction(op, "prediction", prediction)
    _check_value(op, sigma > 0.0 and math.isfinite(sigma), "sigma", "> 0 and finite", sigma)
    _check_value(
        op, sigma_next >= 0.0 and math.isfinite(sigma_next), "sigma_next", ">= 0 and finite", sigma_next
    )
    if prediction == "flow":
        _check_value(op, sigma <= 1.0, "sigma", 'in (0, 1] for prediction "flow"', sigma)
        _check_value(op, sigma_next <= 1.0, "sigma_next", 'in [0, 1] for prediction "flow"', sigma_next)


def check_dpmpp_2m_step_args(
    model_output,
    sample,
    prev_x0,
    alpha_t,
    sigma_t,
    alpha_next,
    sigma_next,
    alpha_prev,
    sigma_prev,
    prediction,
    guidance_scale,
    guidance_rescale,
    clip_x0,
    threshold_quantile,
    threshold_max,
):
    op = "dpmpp_2m_step"
    _check_common(
        op, model_output, sample, guidance_scale, guidance_rescale, clip_x0, threshold_quantile, threshold_max
    )
    _check_prediction(op, "prediction", prediction)
    if prev_x0 is not None:
        _check_like_sample(op, prev_x0, sample, "prev_x0")
    for name, value in (("alpha_t", alpha_t), ("sigma_t", sigma_t), ("alpha_next", alpha_next)):
        _check_value(op, value > 0.0 and math.isfinite(value), name, "> 0", value)
    _check_value(op, sigma_next >= 0.0 and math.isfinite(sigma_next), "sigma_next", ">= 0", sigma_next)
    if prev_x0 is not None:
        for name, value in (("alpha_prev", alpha_prev), ("sigma_prev", sigma_prev)):
            _check_value(op, value > 0.0 and math.isfinite(value), name, "> 0", value)
        if not sigma_next > 0.0:
            raise ValueError(
                f"fastlatent.{op}: a second-order step (prev_x0 given) to sigma_next = 0 is undefined: "
                "take the last step first-order (prev_x0=None)"
            )
        if alpha_prev * sigma_t == alpha_t * sigma_prev:
            raise ValueError(
                f"fastlatent.{op}: the previous step must be at another noise level than the current "
                "one (alpha_prev / sigma_prev == alpha_t / sigma_t)"
            )


def check_convert_prediction_args(
    model_output, sample, alpha_t, sigma_t, source, target, guidance_scale, guidance_rescale
):
    op = "convert_prediction"
    _check_common(op, model_output, sample, guidance_scale, guidance_rescale, None, None, 1.0)
    _check_prediction(op, "source", source)
    _check_prediction(op, "target", target)
    _check_value(op, alpha_t > 0.0 and math.isfinite(alpha_t), "alpha_t", "> 0", alpha_t)
    _check_value(op, sigma_t > 0.0 and math.isfinite(sigma_t), "sigma_t", "> 0", sigma_t)


def resolve_seed(seed, generator, device):
    return seed_from_generator(generator, device) if seed is None else int(seed)


def ddpm_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    *,
    prediction: str = "epsilon",
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_x0: float | None = None,
    threshold_quantile: float | None = None,
    threshold_max: float = 1.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    seed_offset: torch.Tensor | None = None,
    return_x0: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM ancestral step ``x_t -> x_{t_prev}`` (Ho et al. 2020), as diffusers' ``DDPMScheduler``.

    ``x0 -> clip/threshold``, then
    ``x_prev = sqrt(ab_prev) beta_t / (1 - ab_t) x0 + sqrt(alpha_t) (1 - ab_prev) / (1 - ab_t) x_t + std z``
    with ``alpha_t = ab_t / ab_prev``, ``beta_t = 1 - alpha_t`` and the "fixed_small" variance
    ``std^2 = (1 - ab_prev) / (1 - ab_t) beta_t``; ``alpha_bar_prev = 1`` at the last step (no noise).

    Args:
        model_output: ``[B, ...]`` (``[2B, ...]`` with ``guidance_scale``), same dtype as ``sample``.
        sample: ``[B, ...]`` float32/float16/bfloat16 ``x_t``; math in fp32.
        alpha_bar_t, alpha_bar_prev: cumulative alphas at t and at the previous timestep.
        prediction: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` (x0) or ``"flow"``.
        return_x0: also return the (processed) predicted x0; otherwise an empty tensor, saving a write.

    Returns:
        ``(prev_sample, pred_x0)``, both like ``sample``.
    """
    require_device("ddpm_step", model_output, sample)
    _check_inference("ddpm_step", model_output, sample, noise)
    seed = 0 if noise is not None or seed_offset is not None else resolve_seed(seed, generator, sample.device)
    return torch.ops.fastlatent.ddpm_step.default(
        model_output,
        sample,
        float(alpha_bar_t),
        float(alpha_bar_prev),
        prediction,
        guidance_scale,
        float(guidance_rescale),
        clip_x0,
        threshold_quantile,
        float(threshold_max),
        noise,
        seed,
        int(offset),
        seed_offset,
        return_x0,
    )


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    eta: float = 0.0,
    *,
    prediction: str = "epsilon",
    use_clipped_model_output: bool = False,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_x0: float | None = None,
    threshold_quantile: float | None = None,
    threshold_max: float = 1.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    seed_offset: torch.Tensor | None = None,
    return_x0: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM step (Song et al. 2021, eq. 12) with ``eta``, as diffusers' ``DDIMScheduler.step``.

    ``x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - s^2) eps + s z``,
    ``s = eta sqrt((1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev))``. With clipping or thresholding,
    ``use_clipped_model_output=True`` re-derives eps from the processed x0 (GLIDE). Noise is drawn only
    when ``eta > 0``. Arguments and returns as :func:`ddpm_step`.
    """
    require_device("ddim_step", model_output, sample)
    _check_inference("ddim_step", model_output, sample, noise)
    needs_seed = eta > 0 and noise is None and seed_offset is None
    seed = resolve_seed(seed, generator, sample.device) if needs_seed else (0 if seed is None else int(seed))
    return torch.ops.fastlatent.ddim_step.default(
        model_output,
        sample,
        float(alpha_bar_t),
        float(alpha_bar_prev),
        float(eta),
        prediction,
        use_clipped_model_output,
        guidance_scale,
        float(guidance_rescale),
        clip_x0,
        threshold_quantile,
        float(threshold_max),
        noise,
        seed,
        int(offset),
        seed_offset,
        return_x0,
    )


def euler_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    prediction: str = "epsilon",
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_x0: float | None = None,
    threshold_quantile: float | None = None,
    threshold_max: float = 1.0,
    return_x0: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler step of the probability-flow ODE, ``x_next = x + (sigma_next - sigma) (x - x0) / sigma``.

    ``prediction="flow"``: rectified flow / flow matching, ``x = (1 - sigma) x0 + sigma eps`` and the
    model predicts the velocity ``eps - x0``: ``x_next = x + (sigma_next - sigma) v``, as diffusers'
    ``FlowMatchEulerDiscreteScheduler``. Otherwise EDM/Karras sigma space, ``x = x0 + sigma eps`` (the
    model sees ``x / sqrt(sigma^2 + 1)``), as diffusers' ``EulerDiscreteScheduler``. Returns as
    :func:`ddpm_step`.
    """
    require_device("euler_step", model_output, sample)
    _check_inference("euler_step", model_output, sample)
    return torch.ops.fastlatent.euler_step.default(
        model_output,
        sample,
        float(sigma),
        float(sigma_next),
        prediction,
        guidance_scale,
        float(guidance_rescale),
        clip_x0,
        threshold_quantile,
        float(threshold_max),
        return_x0,
    )


def dpmpp_2m_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    prev_x0: torch.Tensor | None,
    alpha_t: float,
    sigma_t: float,
    alpha_next: float,
    sigma_next: float,
    alpha_prev: float = 1.0,
    sigma_prev: float = 1.0,
    *,
    prediction: str = "epsilon",
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_x0: float | None = None,
    threshold_quantile: float | None = None,
    threshold_max: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(2M) step (Lu et al. 2022), midpoint form, as diffusers' ``DPMSolverMultistepScheduler``.

    The sample is ``x = alpha x0 + sigma eps`` at ``(alpha_t, sigma_t)``; with
    ``lambda = log(alpha / sigma)``, ``h = lambda_next - lambda_t``, ``r = (lambda_t - lambda_prev) / h``::

        x_next = sigma_next / sigma_t x - alpha_next (exp(-h) - 1) (x0 + (x0 - prev_x0) / (2 r))

    ``prev_x0=None`` takes the first-order step (the first step, and the last one to
    ``sigma_next = 0``). Returns ``(prev_sample, pred_x0)``: keep ``pred_x0`` as the next step's
    ``prev_x0`` (with ``alpha_prev, sigma_prev`` = this step's ``alpha_t, sigma_t``).
    """
    require_device("dpmpp_2m_step", model_output, sample)
    _check_inference("dpmpp_2m_step", model_output, sample, prev_x0)
    return torch.ops.fastlatent.dpmpp_2m_step.default(
        model_output,
        sample,
        prev_x0,
        float(alpha_t),
        float(sigma_t),
        float(alpha_next),
        float(sigma_next),
        float(alpha_prev),
        float(sigma_prev),
        prediction,
        guidance_scale,
        float(guidance_rescale),
        clip_x0,
        threshold_quantile,
        float(threshold_max),
    )


def convert_prediction(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_t: float,
    sigma_t: float,
    source: str,
    target: str,
    *,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Converts a model output between parameterisations, for ``x = alpha_t x0 + sigma_t eps``.

    ``source``/``target``: ``"epsilon"`` (eps), ``"sample"`` (x0), ``"v_prediction"``
    (``v = a eps - s x0`` with ``(a, s) = (alpha_t, sigma_t) / sqrt(alpha_t^2 + sigma_t^2)``) or
    ``"flow"`` (velocity ``eps - x0``). Guidance is applied first when given. One pass.
    """
    require_device("convert_prediction", model_output, sample)
    _check_inference("convert_prediction", model_output, sample)
    return torch.ops.fastlatent.convert_prediction.default(
        model_output,
        sample,
        float(alpha_t),
        float(sigma_t),
        source,
        target,
        guidance_scale,
        float(guidance_rescale),
    )


def sampler_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    x0_x: float,
    x0_m: float,
    out_x: float,
    out_m: float,
    out_x0: float,
    history: list[torch.Tensor] | tuple = (),
    out_history: list[float] | tuple = (),
    out_noise: float = 0.0,
    *,
    guidance_scale: float | None = None,
    guidance_rescale: float = 0.0,
    clip_x0: float | None = None,
    threshold_quantile: float | None = None,
    threshold_max: float = 1.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    seed_offset: torch.Tensor | None = None,
    return_x0: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generic fused step that every scheduler update above is a case of, with the caller's coefficients.

    With ``m`` the (guided, rescaled) model output and ``x`` the sample::

        x0  = x0_x x + x0_m m,   x0' = clip/threshold(x0)   (or x0 itself)
        out = out_x x + out_m m + out_x0 x0' + sum_j out_history[j] history[j] + out_noise z

    ``history``: up to 3 tensors like ``sample`` (earlier x0 predictions or model outputs of multistep
    solvers: DPM-Solver 3M, UniPC, PNDM, LMS, DEIS), each read once. ``z``: ``noise`` or Philox normals as
    in :func:`ddpm_step` (drawn only when ``out_noise != 0``). The coefficients are host floats (compute
    them in float64; the kernel rounds them to fp32 once), so the step never reads the device.

    Returns:
        ``(prev_sample, x0')``, both like ``sample`` (``x0'`` empty with ``return_x0=False``).
    """
    require_device("sampler_step", model_output, sample)
    _check_inference("sampler_step", model_output, sample, noise, *history)
    needs_seed = out_noise != 0.0 and noise is None and seed_offset is None
    seed = resolve_seed(seed, generator, sample.device) if needs_seed else (0 if seed is None else int(seed))
    return torch.ops.fastlatent.sampler_step.default(
        model_output,
        sample,
        float(x0_x),
        float(x0_m),
        float(out_x),
        float(out_m),
        float(out_x0),
        list(history),
        [float(v) for v in out_history],
        float(out_noise),
        guidance_scale,
        float(guidance_rescale),
        clip_x0,
        threshold_quantile,
        float(threshold_max),
        noise,
        seed,
        int(offset),
        seed_offset,
        return_x0,
    )


def check_sampler_step_args(
    model_output,
    sample,
    coefficients,
    history,
    out_history,
    guidance_scale,
    guidance_rescale,
    clip_x0,
    threshold_quantile,
    threshold_max,
    noise,
    seed_offset,
):
    op = "sampler_step"
    _check_common(
        op, model_output, sample, guidance_scale, guidance_rescale, clip_x0, threshold_quantile, threshold_max
    )
    if len(history) > 3:
        raise ValueError(f"fastlatent.{op}: history takes at most 3 tensors, got {len(history)}")
    if len(out_history) != len(history):
        raise ValueError(
            f"fastlatent.{op}: out_history must have one coefficient per history tensor "
            f"({len(history)}), got {len(out_history)}"
        )
    for h in history:
        _check_like_sample(op, h, sample, "history tensors")
    for name, value in coefficients:
        _check_value(op, math.isfinite(value), name, "finite", value)
    for value in out_history:
        _check_value(op, math.isfinite(value), "out_history", "finite", value)
    _check_noise(op, sample, noise, seed_offset)


def _layout(sample, others):
    """The kernels' output layout: channels_last (2-D or 3-D) when the sample is and every tensor argument
    shares its strides (the kernel then runs on that memory as it is), contiguous otherwise."""
    if sample.is_contiguous():
        return torch.contiguous_format
    layout = None
    if sample.is_contiguous(memory_format=torch.channels_last):
        layout = torch.channels_last
    if sample.is_contiguous(memory_format=torch.channels_last_3d):
        layout = torch.channels_last_3d
    if layout is None or any(t is not None and t.stride() != sample.stride() for t in others):
        return torch.contiguous_format
    return layout


def _outputs(sample, return_x0, *others):
    layout = _layout(sample, others)
    out = torch.empty_like(sample, memory_format=layout)
    return out, (torch.empty_like(sample, memory_format=layout) if return_x0 else sample.new_empty((0,)))


if extension_available():

    @torch.library.register_fake("fastlatent::ddpm_step")
    def _ddpm_fake(
        model_output,
        sample,
        alpha_bar_t,
        alpha_bar_prev,
        prediction="epsilon",
        guidance_scale=None,
        guidance_rescale=0.0,
        clip_x0=None,
        threshold_quantile=None,
        threshold_max=1.0,
        noise=None,
        seed=0,
        offset=0,
        seed_offset=None,
        return_x0=True,
    ):
        check_ddpm_step_args(
            model_output,
            sample,
            alpha_bar_t,
            alpha_bar_prev,
            prediction,
            guidance_scale,
            guidance_rescale,
            clip_x0,
            threshold_quantile,
            threshold_max,
            noise,
            seed_offset,
        )
        return _outputs(sample, return_x0, model_output, noise)

    @torch.library.register_fake("fastlatent::ddim_step")
    def _ddim_fake(
        model_output,
        sample,
        alpha_bar_t,
        alpha_bar_prev,
        eta=0.0,
        prediction="epsilon",
        use_clipped_model_output=False,
        guidance_scale=None,
        guidance_rescale=0.0,
        clip_x0=None,
        threshold_quantile=None,
        threshold_max=1.0,
        noise=None,
        seed=0,
        offset=0,
        seed_offset=None,
        return_x0=True,
    ):
        check_ddim_step_args(
            model_output,
            sample,
            alpha_bar_t,
            alpha_bar_prev,
            eta,
            prediction,
            guidance_scale,
            guidance_rescale,
            clip_x0,
            threshold_quantile,
            threshold_max,
            noise,
            seed_offset,
        )
        return _outputs(sample, return_x0, model_output, noise)

    @torch.library.register_fake("fastlatent::euler_step")
    def _euler_fake(
        model_output,
        sample,
        sigma,
        sigma_next,
        prediction="epsilon",
        guidance_scale=None,
        guidance_rescale=0.0,
        clip_x0=None,
        threshold_quantile=None,
        threshold_max=1.0,
        return_x0=True,
    ):
        check_euler_step_args(
            model_output,
            sample,
            sigma,
            sigma_next,
            prediction,
            guidance_scale,
            guidance_rescale,
            clip_x0,
            threshold_quantile,
            threshold_max,
        )
        return _outputs(sample, return_x0, model_output)

    @torch.library.register_fake("fastlatent::dpmpp_2m_step")
    def _dpmpp_fake(
        model_output,
        sample,
        prev_x0,
        alpha_t,
        sigma_t,
        alpha_next,
        sigma_next,
        alpha_prev=1.0,
        sigma_prev=1.0,
        prediction="epsilon",
        guidance_scale=None,
        guidance_rescale=0.0,
        clip_x0=None,
        threshold_quantile=None,
        threshold_max=1.0,
    ):
        check_dpmpp_2m_step_args(
            model_output,
            sample,
            prev_x0,
            alpha_t,
            sigma_t,
            alpha_next,
            sigma_next,
            alpha_prev,
            sigma_prev,
            prediction,
            guidance_scale,
            guidance_rescale,
            clip_x0,
            threshold_quantile,
            threshold_max,
        )
        return _outputs(sample, True, model_output, prev_x0)

    @torch.library.register_fake("fastlatent::sampler_step")
    def _generic_fake(
        model_output,
        sample,
        x0_x,
        x0_m,
        out_x,
        out_m,
        out_x0,
        history=(),
        out_history=(),
        out_noise=0.0,
        guidance_scale=None,
        guidance_rescale=0.0,
        clip_x0=None,
        threshold_quantile=None,
        threshold_max=1.0,
        noise=None,
        seed=0,
        offset=0,
        seed_offset=None,
        return_x0=True,
    ):
        coefficients = (
            ("x0_x", x0_x),
            ("x0_m", x0_m),
            ("out_x", out_x),
            ("out_m", out_m),
            ("out_x0", out_x0),
            ("out_noise", out_noise),
        )
        check_sampler_step_args(
            model_output,
            sample,
            coefficients,
            history,
            out_history,
            guidance_scale,
            guidance_rescale,
            clip_x0,
            threshold_quantile,
            threshold_max,
            noise,
            seed_offset,
        )
        return _outputs(sample, return_x0, model_output, *history, noise)

    @torch.library.register_fake("fastlatent::convert_prediction")
    def _convert_fake(
        model_output, sample, alpha_t, sigma_t, source, target, guidance_scale=None, guidance_rescale=0.0
    ):
        check_convert_prediction_args(
            model_output, sample, alpha_t, sigma_t, source, target, guidance_scale, guidance_rescale
        )
        return _outputs(sample, False, model_output)[0]
