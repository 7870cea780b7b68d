"""Reference group_norm: torch.nn.functional.group_norm, then the activation and the residual."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlatent.ops.checks.group_norm import (
    check_group_norm_apply_args,
    check_group_norm_args,
    check_group_norm_stats_args,
)


def group_norm(x, weight, bias, groups: int, eps: float = 1e-5, activation: str = "none", residual=None):
    """Ground truth for :func:`fastlatent.ops.group_norm`, computed in float64."""
    check_group_norm_args(x, weight, bias, groups, eps, activation, residual, allow_double=True)
    compute = torch.float64  # exact ground truth: fp32 GroupNorm loses digits when |mean| >> std
    y = F.group_norm(
        x.to(compute),
        groups,
        None if weight is None else weight.to(compute),
        None if bias is None else bias.to(compute),
        eps,
    )
    if activation == "silu":
        y = F.silu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    if residual is not None:
        y = y + residual.to(compute)
    return y.to(x.dtype)


def group_norm_stats(x, groups: int):
    """Ground truth for :func:`fastlatent.ops.group_norm_stats`: two-pass mean and M2 in float64."""
    check_group_norm_stats_args(x, groups, allow_double=True)
    n = x.shape[0]
    per_group = (x.shape[1] // groups) * math.prod(x.shape[2:])
    xg = x.to(torch.float64).reshape(n, groups, per_group)
    if per_group == 0:
        zeros = x.new_zeros((n, groups), dtype=torch.float32)
        return zeros, zeros.clone()
    mean = xg.mean(-1)
    m2 = ((xg - mean[..., None]) ** 2).sum(-1)
    return mean.float(), m2.float()


def group_norm_apply(x, mean, rstd, weight, bias, activation: str = "none"):
    """Ground truth for :func:`fastlatent.ops.group_norm_apply`, computed in float64."""
    check_group_norm_apply_args(x, mean, rstd, weight, bias, activation, allow_double=True)
    n, c, groups = x.shape[0], x.shape[1], mean.shape[1]
    compute = torch.float64
    xg = x.to(compute).reshape(n, groups, (c // groups) * math.prod(x.shape[2:]))
    y = ((xg - mean.to(compute)[..., None]) * rstd.to(compute)[..., None]).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(compute).reshape(shape)
    if bias is not None:
        y = y + bias.to(compute).reshape(shape)
    if activation == "silu":
        y = F.silu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    return y.to(x.dtype)
