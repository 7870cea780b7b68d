"""Noise schedules, computed as diffusers computes them (float32 betas and cumulative products),
so a sampler built on them takes the same steps as the diffusers scheduler of the same config.

- :class:`DiscreteSchedule`: variance-preserving, trained on ``T`` discrete timesteps
  (``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``): ``linear`` (DDPM), ``scaled_linear`` (Stable
  Diffusion), ``cosine`` (Nichol & Dhariwal 2021, "squaredcos_cap_v2").
- :class:`FlowSchedule`: rectified flow / flow matching, ``x_s = (1 - s) x0 + s eps``, continuous
  ``s`` in (0, 1] with the SD3 shift ``s' = shift s / (1 + (shift - 1) s)``.
- :class:`KarrasSchedule`: EDM sigmas (Karras et al. 2022), ``x = x0 + sigma eps``.
- :func:`karras_sigmas`: the EDM spacing ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def cosine_betas(num_train_timesteps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """``steps`` EDM sigmas from ``sigma_max`` down to ``sigma_min`` (no trailing zero)."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return list((hi + ramp * (lo - hi)) ** rho)


@dataclasses.dataclass
class DiscreteSchedule:
    """A VP schedule over ``num_train_timesteps`` discrete training timesteps."""

    kind: str = "scaled_linear"
    num_train_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None

    def __post_init__(self):
        if self.kind not in BETA_SCHEDULES:
            raise ValueError(
                f'fastlatent.sampling: schedule must be "linear", "scaled_linear" or "cosine", '
                f'got "{self.kind}"'
            )
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(
                f"fastlatent.sampling: num_train_timesteps must be an int >= 2, "
                f"got {self.num_train_timesteps}"
            )
        t = self.num_train_timesteps
        if self.kind == "linear":
            betas = linear_betas(t, self.beta_start or 1e-4, self.beta_end or 0.02)
        elif self.kind == "scaled_linear":
            betas = scaled_linear_betas(t, self.beta_start or 0.00085, self.beta_end or 0.012)
        else:
            betas = cosine_betas(t)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # Host copies in double: the sampler's per-step scalars come from here, never from a device.
        self.alpha_bars = self.alphas_cumprod.double().tolist()
        self.sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).tolist()


@dataclasses.dataclass
class FlowSchedule:
    """Rectified-flow time ``s`` in (0, 1], shifted; the model sees ``t = s * num_train_timesteps``."""

    shift: float = 1.0
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if not self.shift > 0:
            raise ValueError(f"fastlatent.sampling: shift must be > 0, got {self.shift}")

    def sigmas(self, steps: int) -> list[float]:
        """``steps`` shifted times from 1 down, as diffusers' FlowMatchEulerDiscreteScheduler spaces them.

        diffusers' lower end is the *shifted* smallest training time, and the linspace between the ends is
        shifted once more; this repeats that (and its float32/float64 roundings) so the steps agree.
        """
        t_count = self.num_train_timesteps
        train = np.linspace(1, t_count, t_count, dtype=np.float32)[::-1].copy()
        train_sigmas = torch.from_numpy(train) / t_count
        train_sigmas = self.shift * train_sigmas / (1 + (self.shift - 1) * train_sigmas)
        sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
        sigmas = np.linspace(sigma_max * t_count, sigma_min * t_count, steps) / t_count
        sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        return [float(v) for v in torch.from_numpy(sigmas).to(torch.float32)]


@dataclasses.dataclass
class KarrasSchedule:
    """EDM sigmas; the model gets the raw sample and ``sigma`` (it does its own preconditioning)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"fastlatent.sampling: need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )

    def sigmas(self, steps: int) -> list[float]:
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)


def make_schedule(schedule) -> DiscreteSchedule | FlowSchedule | KarrasSchedule:
    """A schedule object from itself or a name: ``linear``, ``scaled_linear``, ``cosine``, ``flow``,
    ``karras``."""
    if isinstance(schedule, (DiscreteSchedule, FlowSchedule, KarrasSchedule)):
        return schedule
    if schedule in BETA_SCHEDULES:
        return DiscreteSchedule(schedule)
    if schedule == "flow":
        return FlowSchedule()
    if schedule == "karras":
        return KarrasSchedule()
    raise ValueError(
        "fastlatent.sampling: schedule must be a DiscreteSchedule, FlowSchedule, KarrasSchedule or "
        f'one of "linear", "scaled_linear", "cosine", "flow", "karras", got {schedule!r}'
    )
