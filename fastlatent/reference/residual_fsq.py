"""Plain-PyTorch residual FSQ: the ground truth for :func:`fastlatent.ops.residual_fsq`.

The same operations in the same order as vector-quantize-pytorch's ResidualFSQ layers with
``bound_hard_clamp=True`` (one torch op per step, so no FMA contraction), in float32 (float64 for
float64 input). A row holding NaN gives NaN and index -1 in every layer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastlatent.ops.residual_fsq import check_residual_fsq_args


def residual_fsq(
    z: torch.Tensor, scales: torch.Tensor, levels: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    levels = check_residual_fsq_args("residual_fsq", z, scales, levels)
    math = torch.float64 if z.dtype == torch.float64 else torch.float32
    levels_minus_1 = torch.tensor(levels, dtype=torch.int32, device=z.device) - 1
    step = (2.0 / levels_minus_1).to(math)  # a float32 division, as vqp's buffer
    half = (levels_minus_1.float() / 2).to(math)
    basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.int64, device=z.device), 0)
    scales = scales.to(math)
    residual = z.to(math)
    out = torch.zeros_like(residual)
    indices = []
    for scale in scales:
        bracket = residual / scale
        level = torch.floor((bracket.clamp(-1.0, 1.0) + 1) * half + 0.5)
        quantized = (level * step - 1) * scale
        out = quantized if not indices else out + quantized
        residual = residual - quantized
        indices.append((level.nan_to_num(0.0).long() * basis).sum(-1))
    indices = torch.stack(indices, -1) if indices else z.new_empty((*z.shape[:-1], 0), dtype=torch.long)
    nan_rows = residual.isnan().any(-1, keepdim=True)
    out = out.masked_fill(nan_rows, float("nan")).to(z.dtype)
    return out, indices.masked_fill(nan_rows, -1)
