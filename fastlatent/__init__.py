"""fastlatent: fast C++/CUDA kernels for two-stage latent generative models.

The functional API lives in :mod:`fastlatent.ops` (over ``torch.ops.fastlatent.*``);
:mod:`fastlatent.reference` holds the plain-PyTorch ground truth of every op.
"""

from fastlatent import nn, ops, reference, sampling
from fastlatent._extension import build_info, extension_available
from fastlatent._version import __version__
from fastlatent.ops import (
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
from fastlatent.patching import PatchReport, patch, unpatch
from fastlatent.tiling import TiledRunInfo, tiled_decode, tiled_encode

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
