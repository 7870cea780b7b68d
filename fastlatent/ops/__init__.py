"""fastlatent's functional API over ``torch.ops.fastlatent.*``.

Each op has a fake (meta) implementation so ``torch.compile(fullgraph=True)`` traces
through it, checks that raise the same errors as the C++ side, and a plain-PyTorch twin
in :mod:`fastlatent.reference`.
"""

from fastlatent.ops.code_stats import code_stats
from fastlatent.ops.ema_update import ema_update_
from fastlatent.ops.kmeans import kmeans
from fastlatent.ops.nearest_code import nearest_code
from fastlatent.ops.sampler_step import (convert_prediction, ddim_step, ddpm_step, dpmpp_2m_step, euler_step,
                                         seed_from_generator)

__all__ = ["nearest_code", "code_stats", "ema_update_", "kmeans", "ddpm_step", "ddim_step", "euler_step",
           "dpmpp_2m_step", "convert_prediction", "seed_from_generator"]

# The ops registered as torch.ops.fastlatent.* (kmeans is composed from them in Python).
TORCH_OPS = ("nearest_code", "code_stats", "ema_update_", "ddpm_step", "ddim_step", "euler_step", "dpmpp_2m_step",
             "convert_prediction")
