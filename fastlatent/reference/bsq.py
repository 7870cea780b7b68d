"""Reference BSQ in float64: F.normalize, scaled signs, factorised entropy terms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlatent.ops.checks.bsq import check_bsq_args
from fastlatent.ops.checks.lfq import check_positive, math_dtype
from fastlatent.reference.lfq import bit_weights

_EPS = 1e-12


def bsq_quantize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth for :func:`fastlatent.ops.bsq_quantize`."""
    d = check_bsq_args("bsq_quantize", z)
    u = F.normalize(z.double(), dim=-1, eps=_EPS)
    bits = z > 0
    bad = ~torch.isfinite(z).all(-1, keepdim=True)
    mag = torch.tensor(1.0 / math.sqrt(d), dtype=math_dtype(z), device=z.device)
    value = torch.where(bits, mag, -mag).to(z.dtype).masked_fill(bad, float("nan"))
    quantized = value + (u - u.detach()).to(z.dtype)  # straight-through the projection
    indices = (bits.long() * bit_weights(d, z.device)).sum(-1).masked_fill(bad[..., 0], -1)
    return quantized, indices


def bsq_entropy(z: torch.Tensor, inv_temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth for :func:`fastlatent.ops.bsq_entropy`."""
    d = check_bsq_args("bsq_entropy", z)
    check_positive("bsq_entropy", "inv_temperature", inv_temperature)
    u = F.normalize(z.double(), dim=-1, eps=_EPS)
    p = torch.sigmoid(4 * inv_temperature * u / math.sqrt(d))
    h = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
    flat = p.reshape(-1, d)
    avg = flat.mean(0)
    mt = math_dtype(z)
    return h.sum(-1).to(mt), avg.to(mt)
