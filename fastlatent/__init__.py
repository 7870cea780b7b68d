"""fastlatent: fast C++/CUDA kernels for two-stage latent generative models.

The functional API lives in :mod:`fastlatent.ops` (over ``torch.ops.fastlatent.*``);
:mod:`fastlatent.reference` holds the plain-PyTorch ground truth of every op.
"""

__version__ = "0.1.0"

from fastlatent import nn, ops, reference, sampling  # noqa: E402
from fastlatent._extension import build_info, extension_available  # noqa: E402
from fastlatent.ops import (  # noqa: E402
    bsq_entropy,
    bsq_quantize,
    code_stats,
    ema_update_,
    fsq_indices_to_codes,
    fsq_quantize,
    group_norm,
    kmeans,
    lfq_entropy,
    lfq_quantize,
    nearest_code,
)
from fastlatent.patching import PatchReport, patch, unpatch  # noqa: E402
from fastlatent.tiling import TiledRunInfo, tiled_decode, tiled_encode  # noqa: E402

__all__ = [
    "__version__",
    "build_info",
    "extension_available",
    "nn",
    "ops",
    "reference",
    "sampling",
    "nearest_code",
    "code_stats",
    "ema_update_",
    "kmeans",
    "fsq_quantize",
    "fsq_indices_to_codes",
    "lfq_quantize",
    "lfq_entropy",
    "bsq_quantize",
    "bsq_entropy",
    "group_norm",
    "patch",
    "unpatch",
    "PatchReport",
    "tiled_decode",
    "tiled_encode",
    "TiledRunInfo",
]
