"""Plain-PyTorch ground truth for every fastlatent op (same signatures, same rules).

These are slow by design: they favour exactness (float64 where it matters) over speed,
and are what the tests and benchmarks compare against.
"""

from fastlatent.reference.bsq import bsq_entropy, bsq_quantize
from fastlatent.reference.code_stats import code_stats, ema_update_
from fastlatent.reference.fsq import fsq_indices_to_codes, fsq_quantize
from fastlatent.reference.group_norm import group_norm, group_norm_apply, group_norm_stats
from fastlatent.reference.group_norm_conv import group_norm_conv3x3
from fastlatent.reference.lfq import lfq_entropy, lfq_quantize
from fastlatent.reference.nearest_code import nearest_code
from fastlatent.reference.residual_fsq import residual_fsq
from fastlatent.reference.sample_code import sample_code, sample_code_noise
from fastlatent.reference.sampler_steps import (
    convert_prediction,
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    euler_step,
    philox_normal,
    sampler_step,
)

__all__ = [
    "nearest_code",
    "sample_code",
    "sample_code_noise",
    "code_stats",
    "ema_update_",
    "fsq_quantize",
    "fsq_indices_to_codes",
    "residual_fsq",
    "lfq_quantize",
    "lfq_entropy",
    "bsq_quantize",
    "bsq_entropy",
    "group_norm",
    "group_norm_stats",
    "group_norm_apply",
    "group_norm_conv3x3",
    "ddpm_step",
    "ddim_step",
    "euler_step",
    "dpmpp_2m_step",
    "convert_prediction",
    "sampler_step",
    "philox_normal",
]
