"""fastlatent's functional API over ``torch.ops.fastlatent.*``.

Each op has a fake (meta) implementation so ``torch.compile(fullgraph=True)`` traces
through it, checks that raise the same errors as the C++ side, and a plain-PyTorch twin
in :mod:`fastlatent.reference`.
"""

from fastlatent.ops.bsq import bsq_entropy, bsq_quantize
from fastlatent.ops.code_stats import code_stats
from fastlatent.ops.ema_update import ema_update_
from fastlatent.ops.fsq import fsq_indices_to_codes, fsq_quantize
from fastlatent.ops.group_norm import group_norm, group_norm_apply, group_norm_stats, merge_group_stats
from fastlatent.ops.group_norm_conv import group_norm_conv3x3
from fastlatent.ops.kmeans import kmeans
from fastlatent.ops.lfq import lfq_entropy, lfq_quantize
from fastlatent.ops.nearest_code import nearest_code
from fastlatent.ops.residual_fsq import residual_fsq
from fastlatent.ops.sample_code import sample_code
from fastlatent.ops.sampler_steps import (
    convert_prediction,
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    euler_step,
    sampler_step,
    seed_from_generator,
)

__all__ = [
    "nearest_code",
    "sample_code",
    "code_stats",
    "ema_update_",
    "kmeans",
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
    "merge_group_stats",
    "group_norm_conv3x3",
    "ddpm_step",
    "ddim_step",
    "euler_step",
    "dpmpp_2m_step",
    "convert_prediction",
    "sampler_step",
    "seed_from_generator",
]

# The ops registered as torch.ops.fastlatent.* (kmeans is composed from them in Python).
TORCH_OPS = (
    "nearest_code",
    "sample_code",
    "code_stats",
    "ema_update_",
    "fsq_quantize",
    "fsq_quantize_backward",
    "fsq_indices_to_codes",
    "residual_fsq",
    "lfq_quantize",
    "lfq_entropy",
    "lfq_entropy_backward",
    "bsq_quantize",
    "bsq_quantize_backward",
    "bsq_entropy",
    "bsq_entropy_backward",
    "group_norm",
    "group_norm_backward",
    "group_norm_stats",
    "group_norm_apply",
    "group_norm_conv3x3",
    "ddpm_step",
    "ddim_step",
    "euler_step",
    "dpmpp_2m_step",
    "convert_prediction",
    "sampler_step",
)
