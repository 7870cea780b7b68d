"""Reference sampler steps: the formulas as diffusers writes them, in float64, unfused.

Same signatures and rules as :mod:`fastlatent.ops.sampler_steps`. Noise drawn from ``(seed, offset)``
comes from :func:`philox_normal`, a NumPy transcription of the kernels' Philox4x32-10 + Box–Muller
stream (float64 log/cos/sin, so it agrees with the kernels to fp32 rounding, not bit for bit).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastlatent.ops import sampler_steps as sampler_ops

_MASK = np.uint64(0xFFFFFFFF)


def philox_words(seed: int, offset: int, groups: int, first: int = 0) -> np.ndarray:
    """Philox4x32-10 outputs ``[groups, 4]`` (uint64 holding uint32) for counters ``{g, offset}``,
    ``g = first .. first + groups - 1``, key ``seed``."""
    g = np.arange(first, first + groups, dtype=np.uint64)
    c0, c1 = g & _MASK, g >> np.uint64(32)
    c2 = np.full_like(g, np.uint64(offset) & _MASK)
    c3 = np.full_like(g, np.uint64(offset) >> np.uint64(32))
    k0, k1 = np.uint64(seed) & _MASK, np.uint64(seed) >> np.uint64(32)
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    w0, w1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2  # < 2^64: exact in uint64
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + w0) & _MASK, (k1 + w1) & _MASK
    return np.stack([c0, c1, c2, c3], axis=1)


def philox_normal(seed: int, offset: int, count: int) -> torch.Tensor:
    """The first ``count`` normals (float64) of fastlatent's noise stream at ``(seed, offset)``."""
    words = philox_words(int(seed) % 2**64, int(offset) % 2**64, (count + 3) // 4)
    u1 = ((words[:, 0::2] >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * 2.0**-24
    turns = (words[:, 1::2] >> np.uint64(8)).astype(np.float64) * 2.0**-24
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.empty((words.shape[0], 4))
    z[:, 0::2] = r * np.cos(2 * np.pi * turns)
    z[:, 1::2] = r * np.sin(2 * np.pi * turns)
    return torch.from_numpy(z.reshape(-1)[:count].copy())


def _seed_and_offset(sample, noise, seed, offset, seed_offset, generator):
    """The Philox stream of the noise: ``seed_offset``'s values, else ``seed`` (the generator's when None)."""
    if seed_offset is not None:
        return tuple(int(v) for v in seed_offset.tolist())
    if noise is None:
        seed = sampler_ops.resolve_seed(seed, generator, sample.device)
    return seed, offset


def _noise(sample, noise, seed, offset):
    if noise is not None:
        return noise.double()
    return philox_normal(seed, offset, sample.numel()).reshape(sample.shape).to(sample.device)


def _guided(model_output, guidance_scale, guidance_rescale):
    m = model_output.double()
    if guidance_scale is None:
        return m
    uncond, cond = m.chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0:
        # diffusers' rescale_noise_cfg
        dims = list(range(1, guided.dim()))
        std_cond = cond.std(dim=dims, keepdim=True)
        std_cfg = guided.std(dim=dims, keepdim=True)
        guided = guidance_rescale * (guided * (std_cond / std_cfg)) + (1 - guidance_rescale) * guided
    return guided


def _x0_eps(prediction, x, m, alpha, sigma):
    if prediction == "epsilon":
        return (x - sigma * m) / alpha, m
    if prediction == "sample":
        return m, (x - alpha * m) / sigma
    if prediction == "v_prediction":
        k = 1 / math.sqrt(alpha * alpha + sigma * sigma)
        xs = x * k  # the model's input, with alpha k and sigma k on the unit circle
        return alpha * k * xs - sigma * k * m, sigma * k * xs + alpha * k * m
    return (x - sigma * m) / (alpha + sigma), (x + alpha * m) / (alpha + sigma)  # flow


def _process_x0(x0, clip_x0, threshold_quantile, threshold_max):
    if clip_x0 is not None:
        return x0.clamp(-clip_x0, clip_x0)
    if threshold_quantile is None or x0.numel() == 0:
        return x0
    # diffusers' _threshold_sample (Imagen dynamic thresholding)
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), threshold_quantile, dim=1).clamp(min=1, max=threshold_max)[:, None]
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def _result(sample, out, x0, return_x0):
    return out.to(sample.dtype), (x0.to(sample.dtype) if return_x0 else sample.new_empty((0,)))


def ddpm_step(
    model_output,
    sample,
    alpha_bar_t,
    alpha_bar_prev,
    *,
    prediction="epsilon",
    guidance_scale=None,
    guidance_rescale=0.0,
    clip_x0=None,
    threshold_quantile=None,
    threshold_max=1.0,
    noise=None,
    generator=None,
    seed=None,
    offset=0,
    seed_offset=None,
    return_x0=True,
):
    """Reference :func:`fastlatent.ops.ddpm_step` (diffusers' DDPMScheduler.step, "fixed_small")."""
    sampler_ops.check_ddpm_step_args(
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
    seed, offset = _seed_and_offset(sample, noise, seed, offset, seed_offset, generator)
    x = sample.double()
    m = _guided(model_output, guidance_scale, guidance_rescale)
    x0, _ = _x0_eps(prediction, x, m, math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t))
    x0 = _process_x0(x0, clip_x0, threshold_quantile, threshold_max)
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    mean = (math.sqrt(alpha_bar_prev) * beta_t / (1 - alpha_bar_t)) * x0 + (
        math.sqrt(alpha_t) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    ) * x
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    out = mean
    if variance > 0:
        out = mean + math.sqrt(max(variance, 1e-20)) * _noise(sample, noise, seed, offset)
    return _result(sample, out, x0, return_x0)


def ddim_step(
    model_output,
    sample,
    alpha_bar_t,
    alpha_bar_prev,
    eta=0.0,
    *,
    prediction="epsilon",
    use_clipped_model_output=False,
    guidance_scale=None,
    guidance_rescale=0.0,
    clip_x0=None,
    threshold_quantile=None,
    threshold_max=1.0,
    noise=None,
    generator=None,
    seed=None,
    offset=0,
    seed_offset=None,
    return_x0=True,
):
    """Reference :func:`fastlatent.ops.ddim_step` (diffusers' DDIMScheduler.step)."""
    sampler_ops.check_ddim_step_args(
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
    if eta > 0:  # no noise (and no generator draw) at eta = 0
        seed, offset = _seed_and_offset(sample, noise, seed, offset, seed_offset, generator)
    x = sample.double()
    m = _guided(model_output, guidance_scale, guidance_rescale)
    alpha, sigma = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
    x0, eps = _x0_eps(prediction, x, m, alpha, sigma)
    x0 = _process_x0(x0, clip_x0, threshold_quantile, threshold_max)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    std_dev = eta * math.sqrt(max(variance, 0.0))
    if use_clipped_model_output:
        eps = (x - alpha * x0) / sigma
    out = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(1 - alpha_bar_prev - std_dev**2, 0.0)) * eps
    if eta > 0:
        out = out + std_dev * _noise(sample, noise, seed, offset)
    return _result(sample, out, x0, return_x0)


def euler_step(
    model_output,
    sample,
    sigma,
    sigma_next,
    *,
    prediction="epsilon",
    guidance_scale=None,
    guidance_rescale=0.0,
    clip_x0=None,
    threshold_quantile=None,
    threshold_max=1.0,
    return_x0=True,
):
    """Reference :func:`fastlatent.ops.euler_step` (EulerDiscreteScheduler /
    FlowMatchEulerDiscreteScheduler)."""
    sampler_ops.check_euler_step_args(
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
    x = sample.double()
    m = _guided(model_output, guidance_scale, guidance_rescale)
    alpha = 1 - sigma if prediction == "flow" else 1.0
    x0, _ = _x0_eps(prediction, x, m, alpha, sigma)
    x0 = _process_x0(x0, clip_x0, threshold_quantile, threshold_max)
    derivative = (x - x0) / sigma
    out = x + derivative * (sigma_next - sigma)
    return _result(sample, out, x0, return_x0)


def dpmpp_2m_step(
    model_output,
    sample,
    prev_x0,
    alpha_t,
    sigma_t,
    alpha_next,
    sigma_next,
    alpha_prev=1.0,
    sigma_prev=1.0,
    *,
    prediction="epsilon",
    guidance_scale=None,
    guidance_rescale=0.0,
    clip_x0=None,
    threshold_quantile=None,
    threshold_max=1.0,
):
    """Reference :func:`fastlatent.ops.dpmpp_2m_step` (diffusers' dpmsolver++ midpoint updates)."""
    sampler_ops.check_dpmpp_2m_step_args(
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
    x = sample.double()
    m = _guided(model_output, guidance_scale, guidance_rescale)
    x0, _ = _x0_eps(prediction, x, m, alpha_t, sigma_t)
    x0 = _process_x0(x0, clip_x0, threshold_quantile, threshold_max)
    lambda_t = math.log(alpha_t) - math.log(sigma_t)
    lambda_next = math.inf if sigma_next == 0 else math.log(alpha_next) - math.log(sigma_next)
    h = lambda_next - lambda_t
    decay = math.exp(-h) - 1.0
    out = (sigma_next / sigma_t) * x - (alpha_next * decay) * x0
    if prev_x0 is not None:
        lambda_prev = math.log(alpha_prev) - math.log(sigma_prev)
        r0 = (lambda_t - lambda_prev) / h
        d1 = (1.0 / r0) * (x0 - prev_x0.double())
        out = out - 0.5 * (alpha_next * decay) * d1
    return _result(sample, out, x0, True)


def convert_prediction(
    model_output, sample, alpha_t, sigma_t, source, target, *, guidance_scale=None, guidance_rescale=0.0
):
    """Reference :func:`fastlatent.ops.convert_prediction`."""
    sampler_ops.check_convert_prediction_args(
        model_output, sample, alpha_t, sigma_t, source, target, guidance_scale, guidance_rescale
    )
    x = sample.double()
    m = _guided(model_output, guidance_scale, guidance_rescale)
    x0, eps = _x0_eps(source, x, m, alpha_t, sigma_t)
    k = 1 / math.sqrt(alpha_t * alpha_t + sigma_t * sigma_t)
    out = {
        "sample": x0,
        "epsilon": eps,
        "v_prediction": alpha_t * k * eps - sigma_t * k * x0,
        "flow": eps - x0,
    }[target]
    return out.to(sample.dtype)


def sampler_step(
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
    *,
    guidance_scale=None,
    guidance_rescale=0.0,
    clip_x0=None,
    threshold_quantile=None,
    threshold_max=1.0,
    noise=None,
    generator=None,
    seed=None,
    offset=0,
    seed_offset=None,
    return_x0=True,
):
    """Reference :func:`fastlatent.ops.sampler_step` (float64, unfused, differentiable)."""
    coefficients = (
        ("x0_x", x0_x),
        ("x0_m", x0_m),
        ("out_x", out_x),
        ("out_m", out_m),
        ("out_x0", out_x0),
        ("out_noise", out_noise),
    )
    sampler_ops.check_sampler_step_args(
        model_output,
        sample,
        coefficients,
        list(history),
        list(out_history),
        guidance_scale,
        guidance_rescale,
        clip_x0,
        threshold_quantile,
        threshold_max,
        noise,
        seed_offset,
    )
    x = sample.double()
    m = _guided(model_output, guidance_scale, guidance_rescale)
    x0 = _process_x0(x0_x * x + x0_m * m, clip_x0, threshold_quantile, threshold_max)
    out = out_x * x + out_m * m + out_x0 * x0
    for coefficient, h in zip(out_history, history):
        out = out + coefficient * h.double()
    if out_noise != 0.0:
        seed, offset = _seed_and_offset(sample, noise, seed, offset, seed_offset, generator)
        out = out + out_noise * _noise(sample, noise, seed, offset)
    return _result(sample, out, x0, return_x0)
