"""fastlatent: fast C++/CUDA kernels for two-stage latent generative models.

The functional API lives in :mod:`fastlatent.ops` (over ``torch.ops.fastlatent.*``);
:mod:`fastlatent.reference` holds the plain-PyTorch ground truth of every op.
"""

__version__ = "0.1.0"

from fastlatent._extension import build_info, extension_available  # noqa: E402
from fastlatent import nn, ops, reference, sampling  # noqa: E402
from fastlatent.ops import code_stats, ema_update_, kmeans, nearest_code  # noqa: E402

__all__ = ["__version__", "build_info", "extension_available", "nn", "ops", "reference", "sampling",
           "nearest_code", "code_stats", "ema_update_", "kmeans"]
