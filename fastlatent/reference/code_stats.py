"""Reference code_stats and ema_update_: plain PyTorch, float64 accumulation."""

from __future__ import annotations

import torch

from fastlatent.ops.code_stats import check_code_stats_args
from fastlatent.ops.ema_update import check_ema_update_args


def code_stats(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int, deterministic: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth for :func:`fastlatent.ops.code_stats` (index_add in float64)."""
    check_code_stats_args(x, indices, num_codes)
    valid = (indices >= 0) & (indices < num_codes)
    idx, rows = indices[valid], x[valid].double()
    counts = torch.zeros(num_codes, dtype=torch.float64, device=x.device).index_add_(
        0, idx, torch.ones_like(idx, dtype=torch.float64)
    )
    sums = torch.zeros(num_codes, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, idx, rows)
    return counts.float(), sums.float()


def ema_update_(cluster_size, embed_sum, codebook, counts, sums, decay: float, eps: float = 1e-5) -> None:
    """Ground truth for :func:`fastlatent.ops.ema_update_`, written as vector-quantize-pytorch does it."""
    check_ema_update_args(cluster_size, embed_sum, codebook, counts, sums, decay, eps)
    cluster_size.lerp_(counts, 1.0 - decay)
    embed_sum.lerp_(sums, 1.0 - decay)
    n = cluster_size.double().sum()
    smoothed = (cluster_size.double() + eps) / (n + codebook.shape[0] * eps) * n
    codebook.copy_((embed_sum.double() / smoothed[:, None]).to(codebook.dtype))
