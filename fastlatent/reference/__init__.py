"""Plain-PyTorch ground truth for every fastlatent op (same signatures, same rules).

These are slow by design: they favour exactness (float64 where it matters) over speed,
and are what the tests and benchmarks compare against.
"""

from fastlatent.reference.code_stats import code_stats, ema_update_
from fastlatent.reference.nearest_code import nearest_code
from fastlatent.reference.sampler_step import (convert_prediction, ddim_step, ddpm_step, dpmpp_2m_step, euler_step,
                                               philox_normal)

__all__ = ["nearest_code", "code_stats", "ema_update_", "ddpm_step", "ddim_step", "euler_step", "dpmpp_2m_step",
           "convert_prediction", "philox_normal"]
