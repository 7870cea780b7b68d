"""Plain-PyTorch ground truth for every fastlatent op (same signatures, same rules).

These are slow by design: they favour exactness (float64 where it matters) over speed,
and are what the tests and benchmarks compare against.
"""

from fastlatent.reference.code_stats import code_stats, ema_update_
from fastlatent.reference.group_norm import group_norm
from fastlatent.reference.nearest_code import nearest_code

__all__ = ["nearest_code", "code_stats", "ema_update_", "group_norm"]
