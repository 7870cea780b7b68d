"""Reference group_norm: torch.nn.functional.group_norm, then the activation and the residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlatent.ops.group_norm import _check_args


def group_norm(x, weight, bias, groups: int, eps: float = 1e-5, activation: str = "none", residual=None):
    """Ground truth for :func:`fastlatent.ops.group_norm`, computed in float64."""
    _check_args(x, weight, bias, groups, eps, activation, residual, allow_double=True)
    compute = torch.float64  # exact ground truth: fp32 GroupNorm loses digits when |mean| >> std
    y = F.group_norm(x.to(compute), groups, None if weight is None else weight.to(compute),
                     None if bias is None else bias.to(compute), eps)
    if activation == "silu":
        y = F.silu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    if residual is not None:
        y = y + residual.to(compute)
    return y.to(x.dtype)
