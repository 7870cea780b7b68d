"""Reference group_norm_conv3x3: F.group_norm, the activation and F.conv2d in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlatent.ops.group_norm_conv import check_group_norm_conv3x3_args


def group_norm_conv3x3(
    x,
    gn_weight,
    gn_bias,
    groups: int,
    conv_weight,
    conv_bias=None,
    *,
    eps: float = 1e-5,
    activation: str = "silu",
    residual=None,
    algorithm: str = "auto",
):
    """Ground truth for :func:`fastlatent.ops.group_norm_conv3x3`, computed in float64 (``algorithm`` is
    checked and otherwise ignored: both algorithms compute the same function)."""
    check_group_norm_conv3x3_args(
        x, gn_weight, gn_bias, groups, eps, activation, conv_weight, conv_bias, residual, algorithm
    )
    compute = torch.float64

    # by hand rather than F.group_norm, which refuses one value per channel (groups = C on a 1x1 image)
    n, c = x.shape[:2]
    xg = x.to(compute).reshape(n, groups, (c // groups) * x.shape[2] * x.shape[3])
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    if gn_weight is not None:
        y = y * gn_weight.to(compute).reshape(1, c, 1, 1)
    if gn_bias is not None:
        y = y + gn_bias.to(compute).reshape(1, c, 1, 1)
    if activation == "silu":
        y = F.silu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    out = F.conv2d(
        y, conv_weight.to(compute), None if conv_bias is None else conv_bias.to(compute), padding=1
    )
    if residual is not None:
        out = out + residual.to(compute)
    return out.to(x.dtype)
