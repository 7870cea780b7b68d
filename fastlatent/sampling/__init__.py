"""Diffusion sampling on fastlatent's fused step kernels.

- :class:`Sampler`: ``Sampler(method, schedule, steps).sample(model_fn, shape_or_x, cond, guidance, generator,
  capture_graph, progress)``, with ddpm, ddim, euler and dpmpp_2m over VP, flow and EDM schedules.
- Schedules: :class:`DiscreteSchedule` (linear, scaled_linear, cosine), :class:`FlowSchedule`,
  :class:`KarrasSchedule`, :func:`karras_sigmas`.
- :mod:`fastlatent.sampling.schedulers`: drop-in diffusers schedulers (imported lazily).
"""

from fastlatent.sampling.sampler import METHODS, Sampler
from fastlatent.sampling.schedules import (
    DiscreteSchedule,
    FlowSchedule,
    KarrasSchedule,
    cosine_betas,
    karras_sigmas,
    linear_betas,
    make_schedule,
    scaled_linear_betas,
)

__all__ = [
    "Sampler",
    "METHODS",
    "DiscreteSchedule",
    "FlowSchedule",
    "KarrasSchedule",
    "karras_sigmas",
    "linear_betas",
    "scaled_linear_betas",
    "cosine_betas",
    "make_schedule",
]
